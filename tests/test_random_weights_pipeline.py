"""The paper's pipeline with random-weight priors (guidance.weights=random_tiny, fourdfy/guidance/random_weights.py):
preset=paper end to end on the CPU — three stages, MVDream's render-size switch, occupancy updates, checkpoints,
a resume that ends where the uninterrupted run ends, exports — and nothing asked of the model hub. Also the
out-of-memory message (fourdfy/guidance/memory.py) that names the memory keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.runs import flatten_state

from fourdfy.api import generate
from fourdfy.config import compose_run_config
from fourdfy.guidance.memory import GPUOutOfMemoryError, memory_keys_to_try, out_of_memory_message
from fourdfy.kinds import UpdateKind

REPO = Path(__file__).resolve().parents[1]
STAGES = [6, 6, 8]
INTERRUPT_AFTER = 10  # the callback of iteration 10 stops the run: its newest checkpoint is ckpt 10 (every 5)
# preset=paper shrunk to seconds on a CPU: tiny random networks and their sizes (random_weights.TINY_PRIOR_OVERRIDES,
# but MVDream switches from 16² to 32² renders — and from 8 to 4 views in stage 1 — at stage step 3), small hash
# tables, 8 samples per ray, an occupancy grid rebuilt from iteration 4 on, tiny exports.
OVERRIDES = [
    "preset=paper", "device=cpu", "guidance.weights=random_tiny", "prompt='a panda dancing'",
    f"schedule.stage_lengths=[{','.join(map(str, STAGES))}]",
    "field.static_grid.log2_hashmap_size=12", "field.dynamic_grid.log2_hashmap_size=12",
    "field.checkpoint_chunk=1024", "renderer.n_samples=8", "renderer.occupancy_resolution=16",
    "trainer.occupancy_warmup=4", "trainer.occupancy_every=4", "trainer.checkpoint_every=5",
    "trainer.progress_bar=false", "trainer.n_frames=4", "trainer.log_every=1",
    "guidance.mvdream.image_size=32", "guidance.mvdream.render_sizes=[16,32]",
    "guidance.mvdream.render_size_milestones=[3]",
    "guidance.sd_vsd.render_size=32", "guidance.sd_vsd.image_size=64",
    "guidance.zeroscope.n_frames=4", "guidance.zeroscope.render_height=16", "guidance.zeroscope.render_width=24",
    "guidance.zeroscope.image_height=32", "guidance.zeroscope.image_width=48",
    "eval.size=16", "eval.video_size=16", "eval.video_frames=4", "eval.extra_video_frames=2", "eval.grid_views=2",
    "eval.grid_times=2", "eval.n_samples=16", "eval.validation_every=10",
]


class _Stop(Exception):
    """Raised by a callback to cut a run short (as a crash would), after a checkpoint."""


def _final_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))[-1]


def _assert_same_state(a: Path, b: Path) -> None:
    sa = dict(flatten_state(torch.load(a, map_location="cpu", weights_only=False)))
    sb = dict(flatten_state(torch.load(b, map_location="cpu", weights_only=False)))
    assert sa.keys() == sb.keys() and any(k.startswith("/field/") for k in sa)
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sb[key]), f"{key} differs"
        else:
            assert value == sb[key], f"{key}: {value!r} != {sb[key]!r}"


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way the priors reach the hub fails the test (HF_HUB_OFFLINE=1 is set by conftest as well)."""
    import huggingface_hub

    from fourdfy.guidance import weights
    from fourdfy.guidance.mvdream import MVDreamGuidance
    from fourdfy.guidance.sd_vsd import SDVSDGuidance
    from fourdfy.guidance.zeroscope import ZeroscopeGuidance

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the hub was asked: {args} {kwargs}")

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
    for name in ("locate_pretrained", "load_frozen", "load_text_encoder"):
        if hasattr(weights, name):
            monkeypatch.setattr(weights, name, refuse)
    for prior in (MVDreamGuidance, SDVSDGuidance, ZeroscopeGuidance):  # the loading constructors
        monkeypatch.setattr(prior, "from_config", classmethod(refuse))


@pytest.mark.slow
def test_paper_pipeline_with_random_tiny_weights_resumes_to_the_same_end(tmp_path: Path, no_hub: None) -> None:
    cfg = compose_run_config(OVERRIDES)
    assert str(cfg.guidance.weights) == "random_tiny" and cfg.device == "cpu"
    reference = tmp_path / "reference"
    generate(cfg, reference)

    steps = [json.loads(line) for line in (reference / "log.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in steps] == list(range(sum(STAGES)))  # trainer.log_every=1
    assert {s["kind"] for s in steps if s["stage"] == 1} == {"3d"}
    assert {s["kind"] for s in steps if s["stage"] == 2} <= {"3d", "img"}
    assert {s["kind"] for s in steps if s["stage"] == 3} <= {"3d", "img", "vid"}
    assert all(s["skipped_steps"] == 0 for s in steps)
    for name in ("DONE", "config.yaml", "renders/orbit.mp4", "renders/grid.png", "renders/fixed_view.mp4",
                 "renders/curves.png"):
        assert (reference / name).is_file(), name
    assert list((reference / "renders" / "validation").iterdir())  # eval.validation_every=10
    final = _final_checkpoint(reference)
    assert final.name.startswith(f"ckpt_{sum(STAGES):09d}")
    stage_ends = {f"ckpt_{n:09d}.pt" for n in (6, 12, 20)}
    assert stage_ends <= {p.name for p in (reference / "checkpoints").glob("ckpt_*.pt")}

    interrupted = tmp_path / "interrupted"

    def stop(trainer: object, iteration: int) -> None:
        if iteration == INTERRUPT_AFTER:
            raise _Stop

    with pytest.raises(_Stop):
        generate(compose_run_config(OVERRIDES), interrupted, callbacks=[stop])
    assert not (interrupted / "DONE").exists()
    assert _final_checkpoint(interrupted).name == f"ckpt_{INTERRUPT_AFTER:09d}.pt"
    generate(compose_run_config(OVERRIDES), interrupted)  # resumes at iteration 10, through stage 3's start
    assert (interrupted / "DONE").is_file() and (interrupted / "renders" / "orbit.mp4").is_file()
    _assert_same_state(final, _final_checkpoint(interrupted))


def test_random_tiny_priors_are_built_without_the_hub_and_alike_every_time(no_hub: None) -> None:
    from fourdfy.guidance.random_weights import build_random_guidances

    cfg = compose_run_config(OVERRIDES)
    first, n_params = build_random_guidances(cfg, tiny=True)
    again, _ = build_random_guidances(cfg, tiny=True, kinds={UpdateKind.VIDEO})
    assert set(first) == set(UpdateKind) and set(again) == {UpdateKind.VIDEO}
    assert n_params["zeroscope_unet3d"] == sum(p.numel() for p in first[UpdateKind.VIDEO].unet.parameters())
    # A fixed seed: a resumed run rebuilds the same networks (and the global generator is left as it was).
    state = torch.random.get_rng_state()
    for a, b in zip(first[UpdateKind.VIDEO].unet.parameters(), again[UpdateKind.VIDEO].unet.parameters(),
                    strict=True):
        assert torch.equal(a, b)
    build_random_guidances(cfg, tiny=True, kinds={UpdateKind.IMAGE})
    assert torch.equal(torch.random.get_rng_state(), state)


def test_random_weights_build_full_size_networks_for_the_schedules_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """guidance.weights=random asks random_weights for full-size networks, only for the kinds the schedule draws
    (building ~4e9 parameters is a GPU job: bench/gpu_run.sh runs it)."""
    from fourdfy.guidance import random_weights
    from fourdfy.guidance.real import build_real_guidances

    calls = []
    monkeypatch.setattr(random_weights, "build_random_guidances",
                        lambda cfg, tiny, kinds: calls.append((tiny, kinds)) or ({}, {}))
    cfg = compose_run_config(["preset=paper", "device=cpu", "guidance.weights=random",
                              "schedule.stage_lengths=[5,5,0]"])
    build_real_guidances(cfg)
    assert calls == [(False, {UpdateKind.MULTIVIEW, UpdateKind.IMAGE})]


@pytest.mark.slow
def test_videocrafter2_recipe_runs_with_random_weights(tmp_path: Path) -> None:
    """preset=paper_vc (the authors' VideoCrafter2 stage 3, static modules frozen there) with random tiny
    VideoCrafter2 networks: the VID updates reach the dynamic grid, and only it moves in stage 3."""
    from fourdfy.build import build_trainer
    from fourdfy.guidance.videocrafter2 import VideoCrafter2Guidance
    from fourdfy.kinds import ParamGroup

    vc = ["guidance.videocrafter2.n_frames=4", "guidance.videocrafter2.render_height=16",
          "guidance.videocrafter2.render_width=24", "guidance.videocrafter2.image_height=32",
          "guidance.videocrafter2.image_width=48"]
    overrides = [o for o in OVERRIDES if not o.startswith("preset=")] + ["preset=paper_vc", *vc,
                                                                           "schedule.stage_lengths=[0,0,3]",
                                                                           "schedule.stage3_video_only=true"]
    cfg = compose_run_config(overrides)
    trainer = build_trainer(cfg, tmp_path / "run")
    assert isinstance(trainer.guidances[UpdateKind.VIDEO], VideoCrafter2Guidance)
    static = [p.detach().clone() for p in trainer.groups[ParamGroup.STATIC]]
    dynamic = [p.detach().clone() for p in trainer.groups[ParamGroup.DYNAMIC]]
    for _ in range(3):
        scalars = trainer.step()
        assert scalars["kind"] == "vid" and scalars["skipped_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(static, trainer.groups[ParamGroup.STATIC], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(dynamic, trainer.groups[ParamGroup.DYNAMIC], strict=True))


def test_pretrained_is_the_default_and_keeps_existing_fingerprints() -> None:
    from fourdfy.rundir import config_fingerprint

    cfg = compose_run_config(["preset=paper"])
    assert str(cfg.guidance.weights) == "pretrained"
    random = compose_run_config(["preset=paper", "guidance.weights=random"])
    assert config_fingerprint(random) != config_fingerprint(cfg)  # a random-weight run is another run


def test_out_of_memory_names_the_memory_keys_not_yet_set() -> None:
    paper = compose_run_config(["preset=paper", "device=cpu"])
    keys = memory_keys_to_try(paper)
    for prior in ("mvdream", "sd_vsd", "zeroscope"):
        assert f"guidance.{prior}.offload=true" in keys and f"guidance.{prior}.vae_gradient_checkpointing=true" in keys
    assert "guidance.zeroscope.vae_grad_frames=4" in keys
    low = compose_run_config(["preset=paper_24gb", "device=cpu"])
    assert not any("offload" in k or "vae_grad" in k for k in memory_keys_to_try(low))  # all pulled already
    message = out_of_memory_message(paper, "CUDA out of memory. Tried to allocate 2.00 GiB\nmore", "at iteration 7")
    assert "\n" not in message and message.startswith("CUDA out of memory")
    assert "at iteration 7" in message and "preset=paper_24gb" in message and "field.checkpoint_chunk" in message


def test_an_out_of_memory_error_in_training_is_one_line_naming_the_keys(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from fourdfy.trainer import Trainer

    def oom(self: Trainer) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "step", oom)
    with pytest.raises(GPUOutOfMemoryError, match=r"\(at iteration 0\).*preset=paper_24gb.*field.checkpoint_chunk"):
        generate(compose_run_config(["preset=smoke"]), tmp_path / "run")


@pytest.mark.slurm
@pytest.mark.slow
def test_random_tiny_pipeline_runs_through_the_slurm_launcher(slurm_cluster: str, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "outputs"
    command = [sys.executable, str(REPO / "run.py"), "-m", *OVERRIDES, "hydra/launcher=slurm",
               f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.timeout_min=20", "hydra.launcher.mem_gb=4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    (done,) = list(sweep_dir.rglob("DONE"))
    assert (done.parent / "renders" / "orbit.mp4").is_file()
