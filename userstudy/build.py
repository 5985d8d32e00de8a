"""Build the static user-study site: pair two methods' videos by prompt, one page per comparison.

    python -m userstudy.build --ours RUNS_A --baseline RUNS_B --out SITE [--seed N]
                              [--ours-name NAME --baseline-name NAME]

Each side is either a folder of run directories (`config.yaml` with top-level `prompt` and
`variant.name`, `renders/orbit.mp4`, and a `DONE` file when finished) or a folder of videos named by
prompt (`a_panda_dancing.mp4` -> "a panda dancing", as MAV3D's website and the authors' survey name
them). `--baseline` may be repeated to put several baselines in one survey (the paper's survey mixed
MAV3D and ablation questions). Left/right placement and page order are drawn from `--seed`, which is
recorded in `manifest.json` together with every comparison's prompt, methods and video files, and
the list of files raters may fetch (`public_files`), the only ones `userstudy.serve` serves.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import random
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from jinja2 import Environment, FileSystemLoader, select_autoescape

from fourdfy.atomic import write_text_atomic
from userstudy import CHOICES, CRITERIA

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
# Files copied verbatim from templates/ into SITE/static/.
STATIC_FILES: tuple[str, ...] = ("style.css", "study.js")
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2  # 2: `public_files`, the allow-list the server serves from
ORBIT_VIDEO = Path("renders") / "orbit.mp4"  # the run-directory layout fixed by the lead


def normalise_prompt(text: str) -> str:
    """Key used to pair prompts: case-insensitive, whitespace collapsed, one trailing period ignored."""
    key = " ".join(text.split()).casefold()
    return key[:-1].rstrip() if key.endswith(".") else key


def prompt_from_filename(path: Path) -> str:
    """`a_panda_dancing.mp4` -> "a panda dancing" (the naming of MAV3D's and the authors' video files)."""
    return path.stem.replace("_", " ").strip()


@dataclass(frozen=True)
class SideVideo:
    """One method's video for one prompt."""

    prompt: str  # the prompt as written by its source (config.yaml or file name)
    video: Path  # the mp4 to show
    source: Path  # the run directory, or the video itself for a folder of videos


@dataclass
class Side:
    """All videos of one method, keyed by `normalise_prompt`."""

    name: str  # method name written to the manifest and the CSV
    kind: Literal["runs", "videos"]  # how `root` was read
    root: Path  # the folder given on the command line
    videos: dict[str, SideVideo] = field(default_factory=dict)  # normalised prompt -> video
    skipped: list[str] = field(default_factory=list)  # runs left out, with the reason


def _find_run_configs(root: Path) -> list[Path]:
    """config.yaml files under root, skipping hidden folders (Hydra writes `.hydra/config.yaml` too)."""
    found: list[Path] = []
    for path in sorted(root.rglob("config.yaml")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts[:-1]):
            continue
        found.append(path)
    return found


def _read_run_config(path: Path) -> tuple[str, str]:
    """(prompt, variant name) from a run's resolved config.yaml."""
    with path.open(encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("prompt"), str):
        raise ValueError(f"{path}: expected a top-level string `prompt` in the run's config.yaml")
    variant = cfg.get("variant")
    if not isinstance(variant, dict) or not isinstance(variant.get("name"), str):
        raise ValueError(f"{path}: expected `variant.name` (a string) in the run's config.yaml")
    return cfg["prompt"], variant["name"]


def _add_video(side: Side, item: SideVideo) -> None:
    key = normalise_prompt(item.prompt)
    if not key:
        raise ValueError(f"{item.source}: empty prompt")
    if key in side.videos:
        raise ValueError(
            f"method {side.name!r} has two videos for prompt {item.prompt!r}: {side.videos[key].source} and "
            f"{item.source}; keep one per prompt (e.g. move the other seed's run elsewhere)"
        )
    side.videos[key] = item


def load_side(root: Path, name: str | None = None, variant: str | None = None) -> Side:
    """Read one side of the comparison from a folder of runs or a folder of prompt-named videos.

    Args:
        root: the folder.
        name: method name; default: the runs' `variant.name`, or the folder name for videos.
        variant: keep only runs with this `variant.name` (needed when a sweep folder mixes variants).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder (expected run directories or prompt-named .mp4 files)")
    configs = _find_run_configs(root)
    loose_videos = sorted(p for p in root.glob("*.mp4") if p.is_file())
    if configs and loose_videos:
        raise ValueError(f"{root} holds both run directories and loose .mp4 files; give one kind per side")
    if not configs and not loose_videos:
        raise ValueError(f"{root} holds neither run directories (config.yaml) nor .mp4 files")

    if loose_videos:
        if variant is not None:
            raise ValueError(f"variant filter {variant!r} given for {root}, a folder of videos, not runs")
        side = Side(name=name or root.name, kind="videos", root=root)
        for path in loose_videos:
            _add_video(side, SideVideo(prompt=prompt_from_filename(path), video=path, source=path))
        return side

    runs: list[tuple[Path, str, str]] = []
    skipped: list[str] = []
    for cfg_path in configs:
        run_dir = cfg_path.parent
        prompt, run_variant = _read_run_config(cfg_path)
        if variant is not None and run_variant != variant:
            continue
        if not (run_dir / "DONE").is_file():
            skipped.append(f"{run_dir}: no DONE file (run unfinished)")
            continue
        if not (run_dir / ORBIT_VIDEO).is_file():
            skipped.append(f"{run_dir}: DONE but no {ORBIT_VIDEO}")
            continue
        runs.append((run_dir, prompt, run_variant))
    variants = sorted({v for _, _, v in runs})
    if len(variants) > 1:
        raise ValueError(
            f"{root} mixes variants {variants}; choose one with --ours-variant/--baseline-variant"
        )
    default_name = variants[0] if variants else root.name
    side = Side(name=name or default_name, kind="runs", root=root, skipped=skipped)
    for run_dir, prompt, _ in runs:
        _add_video(side, SideVideo(prompt=prompt, video=run_dir / ORBIT_VIDEO, source=run_dir))
    return side


@dataclass(frozen=True)
class Pairing:
    """Prompts two sides share, and those only one side has."""

    paired: list[tuple[SideVideo, SideVideo]]  # (ours, baseline), sorted by normalised prompt
    only_ours: list[str]  # prompts with no baseline video
    only_baseline: list[str]  # prompts with no video of ours


def pair_sides(ours: Side, baseline: Side) -> Pairing:
    """Match videos by `normalise_prompt`."""
    shared = sorted(ours.videos.keys() & baseline.videos.keys())
    return Pairing(
        paired=[(ours.videos[k], baseline.videos[k]) for k in shared],
        only_ours=sorted(ours.videos[k].prompt for k in ours.videos.keys() - baseline.videos.keys()),
        only_baseline=sorted(baseline.videos[k].prompt for k in baseline.videos.keys() - ours.videos.keys()),
    )


def _display_prompt(ours: Side, ours_video: SideVideo, baseline: Side, base_video: SideVideo) -> str:
    # A run's config holds the prompt the model saw; a file name lost case and punctuation.
    if ours.kind == "runs" or baseline.kind == "videos":
        return ours_video.prompt
    return base_video.prompt


def _copy_video(src: Path, videos_dir: Path) -> str:
    """Copy under a content-hash name, so the URL does not reveal the method; returns the site path."""
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    dest = videos_dir / f"{digest}.mp4"
    if not dest.exists():
        shutil.copyfile(src, dest)
    return f"videos/{dest.name}"


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
        if not (out / MANIFEST_NAME).is_file():
            raise ValueError(f"--overwrite refused: {out} has no {MANIFEST_NAME}, so no site was built there")
        shutil.rmtree(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "static").mkdir(parents=True, exist_ok=True)


def build_site(
    ours: Side, baselines: Sequence[Side], out: Path, seed: int = 0, overwrite: bool = False,
) -> dict:
    """Write the site into `out` and return the manifest (also written as out/manifest.json)."""
    if not baselines:
        raise ValueError("give at least one baseline")
    names = [ours.name, *(b.name for b in baselines)]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must differ, got {names}; set them with --ours-name/--baseline-name")
    out = Path(out)

    pairings = {b.name: pair_sides(ours, b) for b in baselines}
    entries: list[dict] = []
    for baseline in baselines:
        for ours_video, base_video in pairings[baseline.name].paired:
            entries.append({
                "prompt": _display_prompt(ours, ours_video, baseline, base_video),
                "sides": [(ours.name, ours_video), (baseline.name, base_video)],
            })
    if not entries:
        raise ValueError(
            "no prompt is shared by the two sides; unpaired: "
            + json.dumps({n: {"only_ours": p.only_ours, "only_baseline": p.only_baseline}
                          for n, p in pairings.items()})
        )
    _prepare_out(out, overwrite)

    # One generator, seeded once: first the page order, then left/right per comparison.
    rng = random.Random(seed)
    rng.shuffle(entries)
    width = max(3, len(str(len(entries))))
    comparisons: dict[str, dict] = {}
    for index, entry in enumerate(entries, start=1):
        first, second = entry["sides"]
        left, right = (first, second) if rng.random() < 0.5 else (second, first)
        cid = f"c{index:0{width}d}"
        comparisons[cid] = {
            "index": index,
            "page": f"{cid}.html",
            "prompt": entry["prompt"],
            "left": {"method": left[0], "video": _copy_video(left[1].video, out / "videos"),
                     "source": str(left[1].source.resolve())},
            "right": {"method": right[0], "video": _copy_video(right[1].video, out / "videos"),
                      "source": str(right[1].source.resolve())},
        }

    manifest = {
        "version": MANIFEST_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "ours": ours.name,
        "methods": {s.name: {"kind": s.kind, "root": str(s.root.resolve())} for s in (ours, *baselines)},
        "criteria": [{"key": c.key, "label": c.label} for c in CRITERIA],
        "choices": list(CHOICES),
        "comparisons": comparisons,
        "unpaired": {n: {"only_" + ours.name: p.only_ours, "only_" + n: p.only_baseline}
                     for n, p in pairings.items()},
        "skipped_runs": {s.name: s.skipped for s in (ours, *baselines) if s.skipped},
    }
    pages = _render_pages(out, comparisons)
    videos = [side["video"] for comp in comparisons.values() for side in (comp["left"], comp["right"])]
    # The server serves these names and nothing else (not this manifest, not stray files in `out`).
    manifest["public_files"] = sorted({*pages, *videos})
    # Atomic: a server (or --overwrite) never reads half a manifest, the file that says what is public.
    write_text_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _render_pages(out: Path, comparisons: dict[str, dict]) -> list[str]:
    """Write the HTML pages and static files; returns their paths relative to `out` (POSIX)."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=select_autoescape(["html"], default_for_string=True, default=True),
        keep_trailing_newline=True,
    )
    ids = list(comparisons)
    total = len(ids)
    first_page = comparisons[ids[0]]["page"]
    (out / "index.html").write_text(
        env.get_template("index.html").render(criteria=CRITERIA, total=total, first_page=first_page),
        encoding="utf-8",
    )
    (out / "done.html").write_text(env.get_template("done.html").render(total=total), encoding="utf-8")
    page = env.get_template("comparison.html")
    for pos, cid in enumerate(ids):
        comp = comparisons[cid]
        (out / comp["page"]).write_text(page.render(
            comparison_id=cid,
            number=pos + 1,
            total=total,
            done_before=pos,
            prompt=comp["prompt"],
            left_video=comp["left"]["video"],
            right_video=comp["right"]["video"],
            prev_page=comparisons[ids[pos - 1]]["page"] if pos > 0 else "index.html",
            next_page=comparisons[ids[pos + 1]]["page"] if pos + 1 < total else "done.html",
            criteria=CRITERIA,
        ), encoding="utf-8")
    for name in STATIC_FILES:
        shutil.copyfile(TEMPLATES_DIR / name, out / "static" / name)
    return ["index.html", "done.html", *(comparisons[cid]["page"] for cid in ids),
            *(f"static/{name}" for name in STATIC_FILES)]


def _report(manifest: dict, out: Path) -> str:
    lines = [f"wrote {len(manifest['comparisons'])} comparisons to {out} (seed {manifest['seed']})"]
    for baseline, unpaired in manifest["unpaired"].items():
        for label, prompts in unpaired.items():
            if prompts:
                lines.append(f"unpaired vs {baseline}: {len(prompts)} prompt(s) {label}: "
                             + "; ".join(prompts))
    for method, reasons in manifest["skipped_runs"].items():
        for reason in reasons:
            lines.append(f"skipped run of {method}: {reason}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userstudy.build", description=__doc__.splitlines()[0])
    parser.add_argument("--ours", type=Path, required=True, help="our runs, or our prompt-named videos")
    parser.add_argument("--baseline", type=Path, required=True, action="append",
                        help="a baseline's runs or prompt-named videos (repeat for several baselines)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the site (new or empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of page order and left/right placement")
    parser.add_argument("--ours-name", default=None,
                        help="our method's name (default: variant or folder name)")
    parser.add_argument("--baseline-name", action="append", default=None,
                        help="baseline name(s), one per --baseline, in the same order")
    parser.add_argument("--ours-variant", default=None, help="keep only our runs with this variant.name")
    parser.add_argument("--baseline-variant", action="append", default=None,
                        help="variant.name filter per --baseline (use '' for none)")
    parser.add_argument("--overwrite", action="store_true", help="replace a site previously built in --out")
    args = parser.parse_args(argv)

    n = len(args.baseline)
    per_baseline = (("--baseline-name", args.baseline_name), ("--baseline-variant", args.baseline_variant))
    for flag, values in per_baseline:
        if values is not None and len(values) != n:
            parser.error(f"{flag} was given {len(values)} time(s) but --baseline {n} time(s); "
                         "give one per baseline")
    names = args.baseline_name or [None] * n
    variants = [v or None for v in (args.baseline_variant or [None] * n)]
    try:
        ours = load_side(args.ours, args.ours_name, args.ours_variant)
        baselines = [load_side(p, nm, v) for p, nm, v in zip(args.baseline, names, variants, strict=True)]
        manifest = build_site(ours, baselines, args.out, seed=args.seed, overwrite=args.overwrite)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_report(manifest, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
