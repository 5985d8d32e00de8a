"""The occupancy grid in training: renders with it match renders without it within a derived bound, it
marks a toy scene's object occupied and far space empty, it never empties itself, the trainer rebuilds it
at the configured iterations and times, and a resumed run restores it (bitwise-exact resume)."""

from __future__ import annotations

import math
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.runs import run_generate_in_subprocess
from scipy import ndimage
from torch import nn

from fourdfy.build import build_trainer
from fourdfy.checkpoint import list_checkpoints, load_latest_checkpoint
from fourdfy.config import compose_run_config
from fourdfy.render.rays import get_rays
from fourdfy.render.trajectories import orbit_cameras
from fourdfy.render.volume import Renderer, RendererConfig
from fourdfy.synthetic.scenes import EDGE_SOFTNESS, SOLID_DENSITY, get_scene
from fourdfy.trainer import Trainer, TrainerConfig

REPO = Path(__file__).resolve().parents[1]
# Tiny run: warm-up 3, updates every 4 iterations, 5 probe times in stage 3; checkpoints every 5.
OCC_SMOKE = ["preset=smoke", "schedule.stage_lengths=[10,10,10]", "trainer.checkpoint_every=5",
             "renderer.occupancy_grid=true", "trainer.occupancy_warmup=3", "trainer.occupancy_every=4",
             "trainer.occupancy_times=5"]


def _trainer(cfg, run_dir, callbacks=None) -> Trainer:
    # As generate() does: the field is initialised from cfg.seed, so every trainer of a test starts alike.
    return build_trainer(cfg, run_dir, callbacks=callbacks)


# ---------------------------------------------------------------- the grid against the dense path


class CellField(nn.Module):
    """Density and colour constant on each cell of an R³ grid over [-h, h]³ (zero outside): the density at
    any sample is its cell's centre value, so the grid's threshold bounds every skipped sample exactly."""

    def __init__(self, density: torch.Tensor, rgb: torch.Tensor, half_size: float):
        super().__init__()
        self.density, self.rgb, self.half_size = density, rgb, half_size

    def cell_index(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, 3] -> (cell index [N, 3] clamped into the grid, inside [N])."""
        r = self.density.shape[0]
        index = torch.floor((x + self.half_size) / (2 * self.half_size) * r).long()
        inside = ((index >= 0) & (index < r)).all(dim=-1)
        return index.clamp(0, r - 1), inside

    def forward(self, x, t):
        index, inside = self.cell_index(x)
        i, j, k = index.unbind(-1)
        return self.density[i, j, k] * inside, self.rgb[i, j, k]


@pytest.mark.parametrize("dilation", [0, 1])
def test_grid_render_matches_dense_render_within_the_skipped_optical_depth(dilation):
    """Coupling bound: with per-sample hits drawn independently with probability α_j, the dense render is
    the colour of the first hit (or the background), the grid render that of the first hit outside the
    skipped set S; the two differ only if some j in S is hit, probability 1 − Π_S(1 − α_j) = 1 − exp(−Σ_S τ_j).
    Colours and background lie in [0, 1], so |Δrgb| and |Δopacity| <= 1 − exp(−Σ_S τ_j) per ray. Every
    skipped sample has τ_j = σ_j δ_j <= σ_j·step <= threshold (δ_j <= step = 2·radius/n), hence the
    threshold's guarantee |Δ| <= 1 − exp(−threshold·|S|)."""
    r, n, thr = 8, 32, 0.01
    cfg = RendererConfig(n_samples=n, radius=1.0, occupancy_grid=True, occupancy_resolution=r,
                         occupancy_threshold=thr, occupancy_dilation=dilation, return_weights=True)
    step = 2 * cfg.radius / n
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(r, r, r, generator=gen)
    density = torch.zeros(r, r, r)
    density[u < 0.5] = 0.8 * thr / step  # faint: below the threshold, skipped unless next to a kept cell
    density[(u >= 0.5) & (u < 0.58)] = 3.0 * thr / step  # above the threshold
    density[3:5, 3:5, 3:5] = 20.0  # a solid block
    field = CellField(density, torch.rand(r, r, r, 3, generator=gen), cfg.radius)

    sparse = Renderer(cfg)
    sparse.update_occupancy(field, torch.tensor([0.0]))
    expected = (density * step > thr).numpy()
    if dilation > 0:
        expected = ndimage.binary_dilation(expected, structure=np.ones((3, 3, 3)), iterations=dilation)
    assert torch.equal(sparse.occupancy.occupied, torch.from_numpy(expected))
    assert 0.05 < expected.mean() < 0.9

    cams = orbit_cameras(3, elevation=25.0)
    times = torch.zeros(3)
    background = torch.tensor([0.2, 0.5, 0.9])
    a = Renderer(RendererConfig(n_samples=n, radius=1.0, return_weights=True)).render(
        field, cams, times, 16, 16, background=background, train=False)
    b = sparse.render(field, cams, times, 16, 16, background=background, train=False)

    # Σ_S τ_j per ray, from the sample points and the expected grid (not the renderer's lookup).
    origins, directions = get_rays(cams, 16, 16)
    t = a["t_samples"].reshape(-1, n)
    points = origins.reshape(-1, 1, 3) + t[..., None] * directions.reshape(-1, 1, 3)
    index, inside = field.cell_index(points.reshape(-1, 3))
    skipped = ~torch.from_numpy(expected)[index[:, 0], index[:, 1], index[:, 2]] & inside
    sigma = field(points.reshape(-1, 3), torch.zeros(len(index)))[0]
    delta = (t[:, 1] - t[:, 0])[:, None]  # evaluation samples: evenly spaced by (far − near)/n <= step
    assert float(delta.max()) <= step + 1e-6
    tau_skipped = (sigma * skipped).reshape(-1, n) * delta
    assert float(tau_skipped.max()) <= thr + 1e-6
    bound = 1.0 - torch.exp(-tau_skipped.sum(dim=1))  # [R]
    n_skipped = skipped.reshape(-1, n).sum(dim=1)
    assert torch.all(bound <= 1.0 - torch.exp(-thr * n_skipped) + 1e-6)

    drgb = (a["rgb"] - b["rgb"]).abs().reshape(-1, 3).max(dim=1).values
    dopacity = (a["opacity"] - b["opacity"]).abs().reshape(-1)
    assert torch.all(drgb <= bound + 1e-5)
    assert torch.all(dopacity <= bound + 1e-5)
    # Not vacuous: faint cells were skipped and did change some pixels, and the solid block is visible.
    assert float(drgb.max()) > 1e-3 and float(a["opacity"].max()) > 0.9


def _toy_scene_sdf_min(centres: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Signed distance of points [N, 3] to "a red ball bouncing on a blue box", minimum over times [T]:
    the box (centre (0, 0, −0.4), half sizes (0.45, 0.45, 0.2)) and the ball (radius 0.22, centre
    (0, −0.25 + 0.5t, −0.2 + 0.22 + 0.45·sin(πt))), from the scene's definition."""
    q = (centres - torch.tensor([0.0, 0.0, -0.4])).abs() - torch.tensor([0.45, 0.45, 0.2])
    box = q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)
    ball_centres = torch.stack([torch.zeros_like(times), -0.25 + 0.5 * times,
                                0.02 + 0.45 * torch.sin(math.pi * times)], dim=-1)  # [T, 3]
    ball = torch.cdist(centres, ball_centres).min(dim=1).values - 0.22
    return torch.minimum(box, ball)


def test_grid_on_a_toy_scene_marks_the_object_occupied_and_far_space_empty():
    """The demo's renderer settings (32 samples through the unit sphere, 32³ cells over [-1, 1]³, threshold
    0.01, one cell of dilation), updated at the trainer's probe times."""
    scene = get_scene("a red ball bouncing on a blue box")
    renderer = Renderer(RendererConfig(n_samples=32, radius=1.0, occupancy_grid=True))
    renderer.update_occupancy(scene, torch.linspace(0.0, 1.0, TrainerConfig().occupancy_times))
    occupied = renderer.occupancy.occupied.reshape(-1)
    r, step, thr = 32, 2.0 / 32, 0.01
    axis = -1.0 + (torch.arange(r) + 0.5) * (2.0 / r)
    centres = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    # Finer than the probe times (1/16 apart): the ball between probes must be covered too.
    sdf = _toy_scene_sdf_min(centres, torch.linspace(0.0, 1.0, 65))
    inside = sdf < 0
    assert torch.all(occupied[inside]), "a cell whose centre is inside the object at some time is empty"
    # density·step = SOLID_DENSITY·sigmoid(−sdf/EDGE_SOFTNESS)·step is <= thr beyond sdf_thr; a cell is kept
    # only if its own or a neighbour's centre (at most √3 cells away) is closer than that.
    sdf_thr = EDGE_SOFTNESS * math.log(SOLID_DENSITY * step / thr - 1.0)
    far = sdf > sdf_thr + math.sqrt(3) * (2.0 / r) + 1e-3
    assert not torch.any(occupied[far]), "a cell far from the object at every time is occupied"
    assert inside.float().mean() > 0.02 and far.float().mean() > 0.6  # the checks cover most cells
    assert occupied.float().mean() < 0.3, "mostly empty space should be mostly skipped"


def test_an_empty_or_faint_field_never_empties_the_grid_and_emptied_cells_regrow():
    """Each update re-probes every cell, so the grid follows the field both ways; a field with nothing
    above the threshold keeps its denser-than-average cells (nerfacc's mean clamp) or, if entirely empty,
    the whole grid (an empty grid would cut every gradient to the field)."""
    cfg = RendererConfig(n_samples=32, radius=1.0, occupancy_grid=True, occupancy_resolution=8,
                         occupancy_dilation=0)
    step = 2 * cfg.radius / cfg.n_samples
    renderer = Renderer(cfg)
    centres = renderer.occupancy.cell_centres()
    a, b = centres[6, 6, 6], centres[1, 1, 1]

    def zero(x, t):
        return x.new_zeros(len(x)), x.new_zeros(len(x), 3)

    renderer.update_occupancy(zero, torch.tensor([0.0]))
    assert renderer.occupancy.occupied.all()

    def faint(x, t):  # density·step <= 0.5·threshold everywhere
        density = 0.5 * cfg.occupancy_threshold / step * torch.exp(-((x - a) ** 2).sum(-1) / 0.05)
        return density, x.new_zeros(len(x), 3)

    renderer.update_occupancy(faint, torch.tensor([0.0]))
    occupied = renderer.occupancy.occupied
    assert occupied[6, 6, 6] and not occupied[1, 1, 1] and 0 < occupied.float().mean() < 0.2

    def ball_at(centre):
        def field(x, t):
            return 50.0 * ((x - centre).norm(dim=-1) < 0.3).float(), x.new_zeros(len(x), 3)

        return field

    renderer.update_occupancy(ball_at(a), torch.tensor([0.0]))
    assert renderer.occupancy.occupied[6, 6, 6] and not renderer.occupancy.occupied[1, 1, 1]
    renderer.update_occupancy(ball_at(b), torch.tensor([0.0]))  # the content moved: the grid follows
    assert renderer.occupancy.occupied[1, 1, 1] and not renderer.occupancy.occupied[6, 6, 6]


# ---------------------------------------------------------------- the grid in the trainer


def test_trainer_config_rejects_bad_occupancy_settings():
    for key, value in (("occupancy_every", 0), ("occupancy_warmup", -1), ("occupancy_times", 1)):
        with pytest.raises(ValueError, match=f"trainer.{key}"):
            TrainerConfig(**{key: value}).validate()


def test_trainer_updates_the_grid_at_the_configured_iterations_and_times(tmp_path):
    cfg = compose_run_config(OCC_SMOKE)
    assert cfg.trainer.static_prior_time == 0.0  # the toy world: 3D/IMG steps render t = 0 only
    calls: list[tuple[int, list[float]]] = []
    seen: list[tuple[int, int, float]] = []

    def record(trainer, iteration):
        seen.append((iteration, len(calls), float(trainer.renderer.occupancy.occupied.float().mean())))

    trainer = _trainer(cfg, tmp_path, callbacks=[record])
    update = trainer.renderer.update_occupancy

    def spy(field, times, device=None):
        calls.append((trainer.iteration, [round(t, 6) for t in times.tolist()]))
        update(field, times, device)

    trainer.renderer.update_occupancy = spy
    trainer.train()
    # The iteration at the warm-up's end, the multiples of 4 after it, and the stage starts 10 and 20.
    expected = [3, 4, 8, 10, 12, 16, 20, 24, 28]
    assert [it for it, _ in calls] == expected
    updated_in = [it for k, (it, n_calls, _) in enumerate(seen) if n_calls > (seen[k - 1][1] if k else 0)]
    assert updated_in == expected, "each update happens inside its iteration, before the callbacks"
    for it, times in calls:  # stages 1-2 render only t = 0; stage 3's video steps render all of [0, 1)
        assert times == ([0.0] if it < 20 else [0.0, 0.25, 0.5, 0.75, 1.0]), (it, times)  # t = 0 probed once
    fractions = {it: fraction for it, _, fraction in seen}
    assert all(fractions[it] == 1.0 for it in range(3)), "before the warm-up ends every cell is occupied"
    assert fractions[3] < 0.5, "the blob of the initial field occupies a small part of the grid"


def test_resume_restores_the_grid_and_continues_bitwise(tmp_path):
    cfg = compose_run_config(OCC_SMOKE)
    straight = _trainer(cfg, tmp_path / "straight")
    straight.train()

    def stop(trainer, iteration):
        if iteration == 17:
            raise KeyboardInterrupt  # stands in for the kill (the SIGKILL variant is the slow test below)

    with pytest.raises(KeyboardInterrupt):
        _trainer(cfg, tmp_path / "killed", callbacks=[stop]).train()
    assert list_checkpoints(tmp_path / "killed" / "checkpoints")[-1].name == "ckpt_000000015.pt"
    saved, _ = load_latest_checkpoint(tmp_path / "killed" / "checkpoints")
    assert not saved["renderer"]["occupied"].all(), "the checkpointed grid has pruned cells"
    shutil.copytree(tmp_path / "killed", tmp_path / "control")

    resumed = _trainer(cfg, tmp_path / "killed")
    assert resumed.renderer.occupancy.occupied.all()
    assert resumed.try_resume() and resumed.iteration == 15
    assert torch.equal(resumed.renderer.occupancy.occupied, saved["renderer"]["occupied"])
    resumed.train()
    # Control: the same resume with the grid left all-occupied diverges, so the grid state is what matters.
    control = _trainer(cfg, tmp_path / "control")
    assert control.try_resume()
    control.renderer.occupancy.occupied.fill_(True)
    control.train()

    assert torch.equal(resumed.renderer.occupancy.occupied, straight.renderer.occupancy.occupied)
    a, b, c = straight.state_dict(), resumed.state_dict(), control.state_dict()
    for key in ("field", "background"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert any(not torch.equal(tensor, c["field"][name]) for name, tensor in a["field"].items())




@pytest.mark.slow  # three full runs (training and outputs) in subprocesses
def test_resume_after_sigkill_with_the_grid_is_bitwise_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_generate_in_subprocess(straight, OCC_SMOKE, kill_after=None) == 0
    assert run_generate_in_subprocess(killed, OCC_SMOKE, kill_after=17) == -signal.SIGKILL
    assert list_checkpoints(killed / "checkpoints")[-1].name == "ckpt_000000015.pt"
    assert run_generate_in_subprocess(killed, OCC_SMOKE, kill_after=None) == 0
    a, _ = load_latest_checkpoint(straight / "checkpoints")
    b, _ = load_latest_checkpoint(killed / "checkpoints")
    assert a["iteration"] == b["iteration"] == 30
    assert not a["renderer"]["occupied"].all()
    assert torch.equal(a["renderer"]["occupied"], b["renderer"]["occupied"])
    for key in ("field", "background"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"


# ---------------------------------------------------------------- presets and the benchmark


def test_paper_preset_turns_the_grid_on_at_the_authors_cell_size():
    cfg = compose_run_config(["preset=paper"])
    assert cfg.renderer.occupancy_grid
    cell = 2 * cfg.renderer.radius / cfg.renderer.occupancy_resolution
    assert cell == pytest.approx(2.0 / 32, rel=0.02)  # authors: 32 cells across the box [-1, 1]
    assert (cfg.trainer.occupancy_every, cfg.trainer.occupancy_warmup) == (16, 256)


def test_bench_reports_the_grid_speedup_measured_in_the_same_run():
    from bench.cpu import _compose_demo, bench_occupancy

    result = bench_occupancy(_compose_demo([]), size=4, reps=1, warmup=0)
    for case in ("toy_scene", "demo_field_init"):
        entry = result[case]
        assert entry["speedup"] == pytest.approx(entry["grid_rays_per_s"] / entry["dense_rays_per_s"], rel=0.02)
        assert 0 < entry["samples_kept"] < 0.5 and 0 < entry["occupied_cells"] < 0.5
        assert entry["max_abs_diff"] < 0.05
