"""Full-size GPU benchmark: seconds per iteration of each update kind and of its parts, peak memory, the
networks' floor, and the hours a scene takes.

    python -m bench.gpu --preset paper|lowmem|paper_24gb [--iters 3] [--warmup 1] [--no-occupancy]
                        [--n-samples N] [--set KEY=VALUE ...] [--out bench/results/NAME.json]
    python -m bench.gpu --tiny                # the same code path on tiny models (CPU works), for tests
    python -m bench.gpu --table bench/results/*.json   # bench/README.md's table from saved results

The run is the one ``python run.py preset=paper guidance.weights=random`` trains: its config comes from
``fourdfy.config.compose_run_config(["preset=paper", "device=...", "guidance.weights=random", *overrides])``
(``bench_overrides`` lists the overrides: ``--tiny`` shrinks the hash tables, samples per ray, occupancy grid and
render sizes and builds tiny networks (``random_tiny``); ``lowmem`` sets the priors' memory options;
``paper_24gb`` starts from conf/preset/paper_24gb.yaml; ``--no-occupancy``, ``--n-samples`` and ``--set`` set
the rest) and the trainer from ``fourdfy.build.build_trainer``, whose priors are every network of the paper's
three priors at full size with random weights (fourdfy/guidance/random_weights.py: the compute cost does not
depend on the weight values). `Trainer.step()` is then timed with the update kind forced, per kind.

Rendering skips empty space with the occupancy grid as conf/preset/paper.yaml trains (56³ cells over the
marching sphere's cube, threshold 0.01). The trainer keeps every cell occupied for its first 256 iterations,
longer than any bench, so the grid is built once before timing from the random-weight field, whose density
blob b(x) = 10·(1 − ‖x‖/0.5) makes an object-sized occupancy; the timed iterations are no grid-update
iterations, and one update is timed apart. ``--no-occupancy`` times dense marching (every sample queried).
Samples per ray are the preset's (128) unless ``--n-samples`` says otherwise.

Printed JSON: the machine (``device``: GPU model, ``torch``, ``cuda``, ``date``), the ``overrides``, and per kind
("3d", "img", "vid"):
- ``iteration_s``: median seconds of one full training iteration (render, guidance, backward, AdamW, and
  for IMG the LoRA fine-tuning step), CUDA-synchronised;
- ``iteration_parts_s``: the median of each part of those iterations, from CUDA events recorded inside the
  step (``PartTimer.parts``: render_forward, vae_encode_forward, prior_forward, vae_backward, field_backward,
  optimiser, lora_finetune (IMG), other);
- ``floor_s``: the networks' own work alone at the same shapes, the least any implementation must do:
  the UNet forward passes (CFG batch ×2; IMG: pretrained + LoRA branch), the VAE encoding with its
  backward, and for IMG the LoRA fine-tuning forward + backward; ``floor_parts_s`` lists them;
- ``overhead_ratio`` = iteration_s / floor_s (1.0 = no overhead beyond the networks);
- ``peak_memory_gib``: ``torch.cuda.max_memory_allocated`` over that kind's iterations; ``floor_peak_memory_gib``
  the same over the floor's passes alone;
- ``field_samples_per_ray``: field evaluations per ray over that kind's iterations (marching=authors: its
  α-pruning pass plus the kept samples); with marching=uniform also ``samples_kept``, the fraction of the
  renders' samples that reach the field (in occupied cells), warm-up included (1.0 with ``--no-occupancy``);
and at the top level ``field_checkpoint_chunk``: samples per activation-checkpointed chunk of the field
(``field.checkpoint_chunk`` of the preset, both presets; the field's activations are recomputed in
backward), and ``occupancy``: the grid's settings, ``occupied_cells`` (fraction of cells occupied) and
``update_s`` (one rebuild; the trainer rebuilds every ``occupancy_every`` = 16 iterations), or
``{"grid": false}``; ``resident_memory_gib``: the networks and field at rest; and ``projection``: the expected
count of each kind over the config's schedule (Σ stage length × P(kind | stage); paper: 72,500 3D, 37,500 IMG,
25,000 VID), ``hours_per_scene`` = Σ count × iteration_s / 3600, ``floor_hours_per_scene`` the same with
floor_s, and the occupancy rebuilds' count and hours (an upper bound for 3D: its first 5,000 iterations render
64², the bench times 256²).

Presets: ``paper`` keeps every network on the GPU in fp16 (the authors' half_precision_weights) with the
full VAE graph; ``paper_24gb`` is conf/preset/paper_24gb.yaml (its comments list its memory keys); ``lowmem``
offloads each prior's UNet and text encoder to the CPU between calls, recomputes VAE-encoder activations in
backward and keeps the VAE graph of only 4 of the 16 video frames (the memory levers of
`fourdfy.guidance.memory`, set through their ``guidance.*`` config keys).

Without CUDA (and without --tiny) it exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fourdfy.guidance.random_weights import TINY_PRIOR_OVERRIDES, count_parameters
from fourdfy.kinds import UPDATE_KINDS, UpdateKind
from fourdfy.render.volume import MarchingMode

if TYPE_CHECKING:
    from fourdfy.hybrid import ScheduleConfig

EXIT_NO_CUDA = 2  # exit status when no CUDA device is available

PROMPT = "a panda dancing"  # any prompt: the cost does not depend on it (77 tokens always)
# An iteration of each kind's stage, so the schedule's learning rates and regularisers are those of
# the stage where the kind occurs (stage 1: 3D; stage 2: IMG; stage 3: VID), with the paper's lengths.
# Neither a stage start nor a multiple of occupancy_every (16), so the trainer does not rebuild the
# occupancy grid inside the timed step (the rebuild is timed apart). 3D: after MVDream's switch from 64² to
# 256² renders at step 5000 (render_size_milestones), the size of the other 95% of its steps.
KIND_ITERATION = {UpdateKind.MULTIVIEW: 5_001, UpdateKind.IMAGE: 10_001, UpdateKind.VIDEO: 35_001}
LOWMEM_VAE_GRAD_FRAMES = 4  # lowmem preset: video frames whose VAE encoding keeps its graph (bench's choice)
FIELD_CHECKPOINT_CHUNK_TINY = 1 << 10  # --tiny: small, so that its few thousand samples span several chunks
# --tiny: 16³ cells × 17 times = 70 k field queries per build, not 3 M (seconds on one CPU core, not a minute).
OCCUPANCY_RESOLUTION_TINY = 16
# --tiny: 2^12-entry hash tables (the paper's levels and resolutions), 8 samples per ray, and the tiny
# priors' render sizes (fourdfy.guidance.random_weights.TINY_PRIOR_OVERRIDES).
TINY_OVERRIDES = [
    "field.static_grid.log2_hashmap_size=12", "field.dynamic_grid.log2_hashmap_size=12",
    f"field.checkpoint_chunk={FIELD_CHECKPOINT_CHUNK_TINY}",
    "renderer.n_samples=8", f"renderer.occupancy_resolution={OCCUPANCY_RESOLUTION_TINY}",
    *TINY_PRIOR_OVERRIDES,
]
PRIOR_KEYS = ("mvdream", "sd_vsd", "zeroscope")  # guidance.<key> of each prior's config
# --preset: the conf/preset/ file the run starts from (lowmem = paper + bench_overrides' memory options).
PRESETS = {"paper": "paper", "lowmem": "paper", "paper_24gb": "paper_24gb", "paper_vc": "paper_vc"}


def bench_overrides(preset: str, tiny: bool, device: str, occupancy: bool = True,
                    n_samples: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The Hydra overrides of the bench's run: ``python run.py <these>`` trains the same run (random weights).

    n_samples: samples per ray (None: the preset's; 8 with tiny); extra: more overrides (``--set``), last.
    """
    weights = "random_tiny" if tiny else "random"
    overrides = [f"preset={PRESETS[preset]}", f"device={device}", f"prompt='{PROMPT}'", f"guidance.weights={weights}"]
    if tiny:
        overrides += TINY_OVERRIDES
    if preset == "lowmem":
        overrides += [f"guidance.{key}.{option}=true" for key in PRIOR_KEYS
                      for option in ("offload", "vae_gradient_checkpointing")]
        overrides.append(f"guidance.zeroscope.vae_grad_frames={2 if tiny else LOWMEM_VAE_GRAD_FRAMES}")
    if not occupancy:
        overrides.append("renderer.occupancy_grid=false")
    if n_samples is not None:
        overrides.append(f"renderer.n_samples={n_samples}")
    return overrides + list(extra)


def network_params(guidances: dict[UpdateKind, Any]) -> dict[str, int]:
    """Parameter count of each network of the priors (one VAE and text encoder entry: they are alike)."""
    from fourdfy.guidance.videocrafter2 import VideoCrafter2Guidance

    g3, gi, gv = (guidances.get(k) for k in (UpdateKind.MULTIVIEW, UpdateKind.IMAGE, UpdateKind.VIDEO))
    video_unet = "videocrafter2_unet" if isinstance(gv, VideoCrafter2Guidance) else "zeroscope_unet3d"
    nets = {"mvdream_unet": g3 and g3.unet, "sd21_base_unet": gi and gi.unet,
            "sd21_v_unet": gi and (None if gi.shared else gi.unet_lora),
            video_unet: gv and gv.unet}
    any_prior = g3 or gi or gv
    nets["vae"] = any_prior and any_prior.vae
    nets["clip_text_encoder"] = any_prior and any_prior.text.text_encoder
    return {name: count_parameters(net) for name, net in nets.items() if net is not None}


def expected_kind_counts(schedule: ScheduleConfig) -> dict[UpdateKind, float]:
    """Expected iterations of each update kind over the whole schedule: Σ_stage length × P(kind | stage)."""
    from fourdfy.hybrid import HybridSchedule

    hybrid = HybridSchedule(schedule)
    return {kind: sum(n * hybrid.probabilities(stage)[kind] for stage, n in enumerate(hybrid.stage_lengths, 1))
            for kind in UPDATE_KINDS}


def occupancy_update_count(schedule: ScheduleConfig, warmup: int, every: int, authors: bool = False) -> int:
    """Occupancy-grid updates over the schedule (Trainer._update_occupancy's rule). uniform: from iteration
    ``warmup`` on, at it = warmup, every multiple of ``every`` and every stage start; authors (EMA grid): every
    ``every`` steps of each stage from its step 0."""
    from fourdfy.hybrid import HybridSchedule

    hybrid = HybridSchedule(schedule)
    if authors:
        return sum(-(-n // every) for n in hybrid.stage_lengths)
    starts = {0, *hybrid.stage_ends}
    return sum(1 for it in range(warmup, hybrid.total_iterations) if it % every == 0 or it == warmup or it in starts)


def projected_hours(seconds: dict[str, float], counts: dict[UpdateKind, float]) -> float | None:
    """Hours of a scene: Σ_kind expected count × seconds per iteration of that kind (``seconds`` keyed by the
    kinds' values); None when a kind the schedule uses has no time (not timed, or it failed)."""
    if any(n > 0 and kind.value not in seconds for kind, n in counts.items()):
        return None
    return sum(n * seconds[kind.value] for kind, n in counts.items() if n > 0) / 3600.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls of fn after `warmup` untimed ones (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


class _CountingRenderer:
    """The trainer's renderer, counting the samples marched and those queried.

    Counts the samples marched (rays × n_samples) and those passed to the field (the rest fell in empty
    cells); everything else is the wrapped renderer's (the trainer moves cameras and times to the field's
    device itself).
    """

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer
        self.samples_marched = 0
        self.samples_queried = 0

    def render(self, field: Any, cameras: Any, times: torch.Tensor, height: int, width: int,
               **kwargs: Any) -> dict[str, torch.Tensor]:
        def counting(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.samples_queried += x.shape[0]  # x: [N, 3] of the samples in occupied cells
            return field(x, t)

        self.samples_marched += len(cameras) * height * width * self.renderer.cfg.n_samples
        return self.renderer.render(counting, cameras, times, height, width, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Everything else the trainer uses (occupancy grid, state_dict, ...) is the wrapped renderer's.
        return getattr(self.renderer, name)


class PartTimer:
    """Named points of one iteration: CUDA events on a GPU (recorded on the stream, no synchronisation inside
    the step), perf_counter on the CPU. A name marked twice keeps a list (the VAE encodes twice with some
    frames under no_grad)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, list[Any]] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            point: Any = torch.cuda.Event(enable_timing=True)
            point.record()
        else:
            point = time.perf_counter()
        self.marks.setdefault(name, []).append(point)

    def seconds(self, start: str, end: str) -> float:
        """Σ over the pairs (start_i, end_i) of the time between them (after the step has been synchronised)."""
        pairs = zip(self.marks[start], self.marks[end], strict=True)
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in pairs) / 1000.0
        return sum(b - a for a, b in pairs)

    def parts(self) -> dict[str, float] | None:
        """Seconds of each part of the iteration; None when it skipped its update (non-finite loss: no backward).

        render_forward: Renderer.render; vae_encode_forward: the VAE encoder's forward passes inside the prior;
        prior_forward: the rest of the prior's call (text embeddings, UNet passes with CFG, the loss; with offloading
        the weight transfers too); vae_backward: from the prior's return until the gradient reaches the renders
        (the regularisers' forward is in it, a few element-wise ops); field_backward: from there to the optimiser
        (compositing and field backward, with the field's recomputation); optimiser: AdamW's step;
        lora_finetune: IMG's LoRA step; other: the rest (sampling, learning rates, finite checks).
        """
        needed = ("step_start", "render_start", "prior_end", "renders_grad", "optimiser_start", "step_end")
        if any(name not in self.marks for name in needed):
            return None
        vae = self.seconds("vae_start", "vae_end") if "vae_start" in self.marks else 0.0
        parts = {
            "render_forward": self.seconds("render_start", "render_end"),
            "vae_encode_forward": vae,
            "prior_forward": self.seconds("prior_start", "prior_end") - vae,
            "vae_backward": self.seconds("prior_end", "renders_grad"),
            "field_backward": self.seconds("renders_grad", "optimiser_start"),
            "optimiser": self.seconds("optimiser_start", "optimiser_end"),
        }
        if "finetune_start" in self.marks:
            parts["lora_finetune"] = self.seconds("finetune_start", "finetune_end")
        parts["other"] = self.seconds("step_start", "step_end") - sum(parts.values())
        return parts


class _TimedGuidance:
    """A prior whose call, VAE encoder and fine-tuning step mark the current PartTimer; the rest is the prior's."""

    def __init__(self, guidance: Any, timer: Callable[[], PartTimer]) -> None:
        self.guidance = guidance
        self._timer = timer
        encode = guidance.vae.encode

        def timed_encode(*args: Any, **kwargs: Any) -> Any:
            self._timer().mark("vae_start")
            out = encode(*args, **kwargs)
            self._timer().mark("vae_end")
            return out
        self._restore_encode = lambda: setattr(guidance.vae, "encode", encode)
        guidance.vae.encode = timed_encode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._timer().mark("prior_start")
        out = self.guidance(*args, **kwargs)
        self._timer().mark("prior_end")
        return out

    def finetune_step(self, *args: Any, **kwargs: Any) -> Any:
        self._timer().mark("finetune_start")
        out = self.guidance.finetune_step(*args, **kwargs)
        self._timer().mark("finetune_end")
        return out

    def restore(self) -> Any:
        """Undo the VAE wrapper; the prior itself."""
        self._restore_encode()
        return self.guidance

    def __getattr__(self, name: str) -> Any:
        return getattr(self.guidance, name)


class _TimedRenderer:
    """The (counting) renderer whose render marks the current PartTimer, and whose output's rgb marks it again
    when the backward pass reaches the renders."""

    def __init__(self, renderer: Any, timer: Callable[[], PartTimer]) -> None:
        self.renderer = renderer
        self._timer = timer

    def render(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        self._timer().mark("render_start")
        out = self.renderer.render(*args, **kwargs)
        self._timer().mark("render_end")
        if out["rgb"].requires_grad:
            out["rgb"].register_hook(lambda grad: self._timer().mark("renders_grad"))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.renderer, name)


def time_parts(trainer: Any, kind: UpdateKind, step: Callable[[], None], device: torch.device,
               warmup: int, iters: int) -> tuple[list[float], list[dict[str, float] | None]]:
    """Run step() warmup + iters times with the trainer's renderer, prior of ``kind`` and optimiser marking a
    PartTimer per step; the seconds of each timed step and its parts (PartTimer.parts)."""
    timers: list[PartTimer] = []

    def current() -> PartTimer:
        return timers[-1]

    renderer = trainer.renderer
    timed_guidance = _TimedGuidance(trainer.guidances[kind], current)
    optimiser_step = trainer.optimizer.step
    own_step = trainer.optimizer.__dict__.get("step")  # an instance attribute, if torch set one

    def timed_optimiser_step(*args: Any, **kwargs: Any) -> Any:
        current().mark("optimiser_start")
        out = optimiser_step(*args, **kwargs)
        current().mark("optimiser_end")
        return out

    def timed_step() -> None:
        timers.append(PartTimer(device))
        current().mark("step_start")
        step()
        current().mark("step_end")

    trainer.renderer = _TimedRenderer(renderer, current)
    trainer.guidances[kind] = timed_guidance
    trainer.optimizer.step = timed_optimiser_step
    try:
        times = _timed(timed_step, device, warmup, iters)
    finally:
        trainer.renderer = renderer
        trainer.guidances[kind] = timed_guidance.restore()
        if own_step is None:
            del trainer.optimizer.step  # the class's step again
        else:
            trainer.optimizer.step = own_step
    return times, [t.parts() for t in timers[warmup:]]


def median_parts(parts: list[dict[str, float] | None]) -> dict[str, float] | None:
    """The median of each part over the steps that ran their update (None if none did)."""
    ran = [p for p in parts if p is not None]
    if not ran:
        return None
    return {name: round(statistics.median(p[name] for p in ran), 4) for name in ran[0]}


def floor_parts(kind: UpdateKind, guidance: Any, device: torch.device) -> dict[str, Callable[[], None]]:
    """The networks' own passes of one update of `kind`, at the guidance's shapes, as timed callables."""
    from fourdfy.guidance.memory import encode_latents

    dtype = guidance.dtype
    text_width = guidance.text.text_encoder.config.hidden_size
    gen = torch.Generator().manual_seed(0)

    def vae_fwd_bwd(images_shape: tuple[int, ...]) -> Callable[[], None]:
        images = torch.rand(images_shape, device=device, requires_grad=True)

        def run() -> None:
            encode_latents(guidance.vae, images, gen).sum().backward()
            images.grad = None
        return run

    if kind == UpdateKind.MULTIVIEW:
        b, s = guidance.n_views, guidance.cfg.image_size
        lat = s // 8
        z = torch.randn(2 * b, 4, lat, lat, device=device, dtype=dtype)
        t = torch.full((2 * b,), 500, device=device)
        ctx = torch.randn(2 * b, 77, text_width, device=device, dtype=dtype)
        cam = torch.randn(2 * b, 16, device=device)

        @torch.no_grad()
        def unet() -> None:
            guidance.unet(z, t, ctx, cam, b)
        return {"unet_cfg_forward": unet, "vae_encode_fwd_bwd": vae_fwd_bwd((b, 3, s, s))}
    if kind == UpdateKind.IMAGE:
        s = guidance.cfg.image_size
        lat = s // 8
        z = torch.randn(2, 4, lat, lat, device=device, dtype=dtype)
        t = torch.full((2,), 300, device=device)
        ctx = torch.randn(2, 77, text_width, device=device, dtype=dtype)
        cam = torch.randn(2, 16, device=device)

        @torch.no_grad()
        def unets() -> None:
            with guidance._pretrained_branch():
                guidance.unet(z, t, encoder_hidden_states=ctx)
            guidance.unet_lora(z, t, encoder_hidden_states=ctx, class_labels=cam)

        def lora_train() -> None:
            out = guidance.unet_lora(z[:1], t[:1], encoder_hidden_states=ctx[:1], class_labels=cam[:1]).sample
            out.float().square().mean().backward()
            guidance.optimizer.zero_grad(set_to_none=True)
        return {"unet_cfg_forward_pretrained_and_lora": unets, "lora_finetune_fwd_bwd": lora_train,
                "vae_encode_fwd_bwd": vae_fwd_bwd((1, 3, s, s))}
    if kind == UpdateKind.VIDEO:
        from fourdfy.guidance.videocrafter2 import VideoCrafter2Guidance

        c = guidance.cfg
        z = torch.randn(2, 4, c.n_frames, c.image_height // 8, c.image_width // 8, device=device, dtype=dtype)
        t = torch.full((2,), 500, device=device)
        ctx = torch.randn(2, 77, text_width, device=device, dtype=dtype)

        @torch.no_grad()
        def unet3d() -> None:
            if isinstance(guidance, VideoCrafter2Guidance):  # its UNet's call, with fps conditioning
                guidance.unet_eps(z[:1], 500, ctx)
            else:  # Zeroscope: diffusers' UNet3DConditionModel
                guidance.unet(z, t, encoder_hidden_states=ctx)
        n_grad = c.vae_grad_frames or c.n_frames  # frames encoded with a graph; the rest are forward only
        parts = {"unet_cfg_forward": unet3d,
                 "vae_encode_fwd_bwd": vae_fwd_bwd((n_grad, 3, c.image_height, c.image_width))}
        if n_grad < c.n_frames:
            images = torch.rand(c.n_frames - n_grad, 3, c.image_height, c.image_width, device=device)

            @torch.no_grad()
            def vae_rest() -> None:
                encode_latents(guidance.vae, images, gen)
            parts["vae_encode_forward_no_grad"] = vae_rest
        return parts
    raise ValueError(f"kind must be one of {[str(k) for k in UPDATE_KINDS]}, got {kind!r}")


def build_occupancy(renderer: Any, field: Any, device: torch.device, times: torch.Tensor,
                    iters: int) -> dict[str, Any]:
    """Build the renderer's occupancy grid from the field (as the trainer's first update would) and time a
    rebuild; the JSON entry. times: the times the trainer probes (trainer.occupancy_times over [0, 1]:
    frame times 1/16 apart and t = 1)."""
    cfg = renderer.cfg
    if MarchingMode(cfg.marching) is MarchingMode.authors:
        # EMA grid: one warm-up update probing every cell (stage step 0), then the timed ones probe the sampled
        # cells of a stage step past renderer.authors.grid_warmup, as most of training does.
        generator = torch.Generator().manual_seed(0)
        renderer.update_occupancy(field, times, device=device, iteration=0, generator=generator)

        def update() -> None:
            renderer.update_occupancy(field, times, device=device, iteration=cfg.authors.grid_warmup,
                                      generator=generator)
        update_s = statistics.median(_timed(update, device, 1, iters))
        return {"grid": True, "marching": "authors", "resolution": cfg.authors.grid_resolution,
                "times": len(times), "occupied_cells": round(float(renderer.occupancy.occupied.float().mean()), 4),
                "update_s": round(update_s, 4)}

    def update() -> None:
        renderer.update_occupancy(field, times, device=device)
    update_s = statistics.median(_timed(update, device, 1, iters))  # the warm-up call builds the grid
    return {
        "grid": True, "marching": "uniform", "resolution": cfg.occupancy_resolution, "radius": round(cfg.radius, 6),
        "threshold": cfg.occupancy_threshold, "dilation": cfg.occupancy_dilation, "times": len(times),
        "occupied_cells": round(float(renderer.occupancy.occupied.float().mean()), 4),
        "update_s": round(update_s, 4),
    }


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: GPU model (or "cpu"), torch and CUDA versions, date (UTC)."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def projection(cfg: Any, kinds: dict[str, Any], occupancy: dict[str, Any]) -> dict[str, Any]:
    """Hours per scene at the measured per-kind times over the config's schedule (expected counts of each kind),
    for the iterations and for the networks' floor; plus the occupancy rebuilds. An upper bound for 3D: its
    first render_size_milestones[0] iterations render 64², the bench times the 256² ones."""
    counts = expected_kind_counts(cfg.schedule)
    iteration = {k: e["iteration_s"] for k, e in kinds.items() if "iteration_s" in e}
    floor = {k: e["floor_s"] for k, e in kinds.items() if "floor_s" in e}
    out: dict[str, Any] = {
        "expected_counts": {k.value: round(n, 1) for k, n in counts.items()},
        "hours_per_scene": _round(projected_hours(iteration, counts)),
        "floor_hours_per_scene": _round(projected_hours(floor, counts)),
    }
    if occupancy.get("grid"):
        n = occupancy_update_count(cfg.schedule, cfg.trainer.occupancy_warmup, cfg.trainer.occupancy_every,
                                   authors=MarchingMode(cfg.renderer.marching) is MarchingMode.authors)
        out["occupancy_updates"] = n
        out["occupancy_update_hours"] = round(n * occupancy["update_s"] / 3600.0, 3)
    return out


def _round(hours: float | None) -> float | None:
    return None if hours is None else round(hours, 3)


def run_bench(preset: str, tiny: bool, iters: int, warmup: int, kinds: tuple[UpdateKind, ...],
              occupancy: bool = True, n_samples: int | None = None, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Build everything, time each kind's iteration, its parts and its floor; project hours per scene; the
    JSON-ready result.

    occupancy: march with the occupancy grid (built once, before timing), else densely; n_samples: samples
    per ray (None: the preset's); extra: more Hydra overrides (``--set``).
    """
    from fourdfy.build import build_trainer
    from fourdfy.config import compose_run_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    overrides = bench_overrides(preset, tiny, device.type, occupancy, n_samples, extra)
    cfg = compose_run_config(overrides)
    with tempfile.TemporaryDirectory(prefix="fourdfy-bench-") as run_dir:  # build_trainer writes nothing there
        trainer = build_trainer(cfg, Path(run_dir))  # the priors: guidance.weights=random(_tiny)
    renderer = _CountingRenderer(trainer.renderer)
    trainer.renderer = renderer  # type: ignore[assignment]
    n_params = {**network_params(trainer.guidances), "field": count_parameters(trainer.field)}
    _sync(device)
    result: dict[str, Any] = {
        "preset": preset, "tiny": tiny, **machine_info(device), "overrides": overrides,
        "iters": iters, "warmup": warmup, "n_samples_per_ray": cfg.renderer.n_samples, "n_params": n_params,
        "field_checkpoint_chunk": trainer.field.checkpoint_chunk,
        "build_s": round(time.perf_counter() - t0, 2), "kinds": {},
    }
    if device.type == "cuda":  # the networks and the field at rest: what every iteration starts from
        result["resident_memory_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
    occupancy_times = torch.linspace(0.0, 1.0, cfg.trainer.occupancy_times)
    result["occupancy"] = (build_occupancy(renderer.renderer, trainer.field, device, occupancy_times, iters)
                           if occupancy else {"grid": False})
    grid_before = renderer.renderer.occupancy.occupied if occupancy else None
    for kind in kinds:
        guidance = trainer.guidances[kind]
        size = guidance.render_size(trainer.schedule.moment(KIND_ITERATION[kind]))
        entry: dict[str, Any] = {"n_views": guidance.n_views, "render_size": list(size)}
        try:
            trainer.schedule.kind = lambda i, gen, k=kind: k  # type: ignore[method-assign]

            def step(k: UpdateKind = kind) -> None:
                trainer.iteration = KIND_ITERATION[k]
                trainer.step()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            skipped_before = trainer.skipped_steps
            renderer.samples_marched = renderer.samples_queried = 0
            times, step_parts = time_parts(trainer, kind, step, device, warmup, iters)
            if occupancy and renderer.renderer.occupancy.occupied is not grid_before:
                raise RuntimeError(f"the trainer rebuilt the occupancy grid at iteration {KIND_ITERATION[kind]}:"
                                   " KIND_ITERATION must hold iterations without a grid update")
            rays = renderer.samples_marched / cfg.renderer.n_samples
            # Field evaluations per ray (marching=authors: its α-pruning pass and the kept samples, each counted).
            entry["field_samples_per_ray"] = round(renderer.samples_queried / rays, 2)
            if MarchingMode(cfg.renderer.marching) is MarchingMode.uniform:
                entry["samples_kept"] = round(renderer.samples_queried / renderer.samples_marched, 4)
            entry["iteration_s"] = statistics.median(times)
            entry["iteration_all_s"] = [round(x, 4) for x in times]
            entry["iteration_parts_s"] = median_parts(step_parts)
            entry["skipped_steps"] = trainer.skipped_steps - skipped_before  # non-finite random-weight losses
            if device.type == "cuda":
                entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            parts: dict[str, float] = {}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for name, fn in floor_parts(kind, guidance, device).items():
                nets = [guidance.unet, guidance.text.text_encoder] + (
                    [guidance.unet_lora] if kind == UpdateKind.IMAGE and not guidance.shared else [])
                with guidance.placement.active(*nets):  # offloading: compute only, the transfers are overhead
                    parts[name] = statistics.median(_timed(fn, device, 1, iters))
            if device.type == "cuda":  # the floor alone: networks at rest + one pass's activations
                entry["floor_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            entry["floor_parts_s"] = {k: round(v, 4) for k, v in parts.items()}
            entry["floor_s"] = sum(parts.values())
            entry["overhead_ratio"] = round(entry["iteration_s"] / entry["floor_s"], 3)
            entry["iteration_s"] = round(entry["iteration_s"], 4)
            entry["floor_s"] = round(entry["floor_s"], 4)
        except torch.cuda.OutOfMemoryError as err:  # report and go on with the other kinds
            entry["error"] = f"CUDA out of memory: {str(err).splitlines()[0]}"
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - one kind failing must not lose the others' numbers
            entry["error"] = f"{type(err).__name__}: {err}"
        result["kinds"][kind.value] = entry
        print(f"[bench.gpu] {kind}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result["projection"] = projection(cfg, result["kinds"], result["occupancy"])
    result["total_s"] = round(time.perf_counter() - t0, 1)
    return result


PART_NAMES = ("render_forward", "vae_encode_forward", "prior_forward", "vae_backward", "field_backward",
              "optimiser", "lora_finetune", "other")  # PartTimer.parts, in the order of an iteration


def markdown_table(results: list[dict[str, Any]]) -> str:
    """bench/README.md's table from bench.gpu results (the JSON files under bench/results/): one row per preset
    and kind, with the parts of an iteration and the projected hours per scene."""
    head = ["preset", "device", "date", "kind", "iteration_s", "floor_s", "peak_gib", *PART_NAMES,
            "h/scene", "floor h/scene"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for result in results:
        proj = result.get("projection", {})
        for kind, entry in result["kinds"].items():
            shape = f"{kind} ({entry['n_views']} × {'×'.join(str(x) for x in entry['render_size'])})"
            if "error" in entry:
                cells = [entry["error"][:60]] + [""] * (len(head) - 5)
            else:
                parts = entry.get("iteration_parts_s") or {}
                cells = [entry["iteration_s"], entry["floor_s"], entry.get("peak_memory_gib", ""),
                         *(parts.get(name, "") for name in PART_NAMES),
                         proj.get("hours_per_scene", ""), proj.get("floor_hours_per_scene", "")]
            rows.append("| " + " | ".join(str(c) for c in [result["preset"], result["device"],
                                                              result.get("date", "")[:10], shape, *cells]) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="paper",
                        help="paper: every network on the GPU; lowmem: offloading + VAE memory options; "
                             "paper_24gb: conf/preset/paper_24gb.yaml")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (checks the logic; CPU works)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per kind (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per kind first")
    parser.add_argument("--kinds", default=",".join(UPDATE_KINDS), help="comma-separated update kinds to time")
    parser.add_argument("--no-occupancy", action="store_true",
                        help="march densely (every sample queried) instead of with the paper preset's grid")
    parser.add_argument("--n-samples", type=int, default=None,
                        help="samples per ray (default: conf/preset/paper.yaml's renderer.n_samples, 128)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of the run (repeatable), e.g. guidance.zeroscope.offload=true")
    parser.add_argument("--out", default=None, help="also write the JSON to this file (e.g. bench/results/NAME.json)")
    parser.add_argument("--table", nargs="+", metavar="JSON", default=None,
                        help="print bench/README.md's table from these result files and exit (no GPU needed)")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown_table([json.loads(Path(path).read_text()) for path in args.table]))
        return 0
    if any("=" not in item for item in args.set):
        parser.error(f"--set takes KEY=VALUE overrides, got {args.set}")
    names = tuple(k for k in args.kinds.split(",") if k)
    if not names or any(k not in UPDATE_KINDS for k in names):
        parser.error(f"--kinds must be a comma-separated subset of {','.join(UPDATE_KINDS)}, got {args.kinds!r}")
    kinds = tuple(UpdateKind(k) for k in names)
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    if args.n_samples is not None and args.n_samples < 1:
        parser.error(f"--n-samples must be >= 1 (samples per ray), got {args.n_samples}")
    if not args.tiny and not torch.cuda.is_available():
        print("bench.gpu: no CUDA GPU is available (torch.cuda.is_available() is False); run it on a "
              "machine with a CUDA GPU, or add --tiny to check the logic on tiny models on the CPU.",
              file=sys.stderr)
        return EXIT_NO_CUDA
    result = run_bench(args.preset, args.tiny, args.iters, args.warmup, kinds, not args.no_occupancy,
                       args.n_samples, tuple(args.set))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    failed = [k for k, entry in result["kinds"].items() if "error" in entry]
    if failed:
        print(f"bench.gpu: kinds {failed} failed; see their 'error' in the JSON", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
