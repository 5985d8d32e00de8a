"""Volume rendering of a 4D field (paper Eq. 1): NeRF quadrature along rays through a bounding sphere.

For a ray with samples at distances t_0 < ... < t_{N-1} (between the sphere's near and far):
    δ_i = t_{i+1} − t_i (δ_{N−1} = far − t_{N−1}),  α_i = 1 − exp(−σ_i δ_i),
    T_i = Π_{j<i} (1 − α_j) = exp(−Σ_{j<i} σ_j δ_j),  w_i = T_i α_i,
    rgb = Σ w_i c_i,  opacity = Σ w_i,  depth = Σ w_i t_i.
The paper writes δ_i = ‖μ_i − μ_{i+1}‖; with unit ray directions that is t_{i+1} − t_i.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fourdfy.render.cameras import Cameras
from fourdfy.render.rays import get_rays, ray_sphere_near_far

Field = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""field(x [N, 3] world coords, t [N] in [0, 1]) -> (density [N] >= 0, rgb [N, 3] in [0, 1])."""

Background = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
"""A solid colour [3] or per-view colours [B, 3], or background(directions [N, 3]) -> rgb [N, 3]."""


@dataclass
class RendererConfig:
    """Ray marching settings."""

    # Samples per ray. The authors march with step 1.732·2·radius/512 (renderer.num_samples_per_ray: 512,
    # with an occupancy grid); 48 dense samples is this project's CPU default (DESIGN.md calibration).
    n_samples: int = 48
    # Radius of the sphere rays are marched through: the bounding sphere of the scene box [-1, 1]^3
    # (geometry.radius: 1.0 in the authors' configs is the half-side of that box).
    radius: float = math.sqrt(3.0)
    # Stratified jitter of each sample inside its bin in training (authors: nerfacc stratified=True in
    # training); evaluation samples sit at the bin starts, which makes Σδ exactly far − near.
    stratified: bool = True
    # Rays per field call; bounds the transient memory of a call. Under autograd the field's activations of
    # all chunks are kept for backward unless field.checkpoint_chunk recomputes them, so this mainly helps
    # no-grad (evaluation) renders. None: one call.
    chunk_rays: int | None = 65536
    # Background used when render(background=None): white if True, black otherwise.
    white_background: bool = False
    # Also return per-sample weights [B, H, W, n_samples] and sample distances t [B, H, W, n_samples].
    return_weights: bool = False
    # Skip the field where an occupancy grid says space is empty (authors: nerfacc OccGridEstimator). Off
    # by default; while on, Renderer.update_occupancy(field, times) (re)builds the grid — the Trainer does
    # it on the trainer.occupancy_* schedule (before the first update every cell counts as occupied).
    occupancy_grid: bool = False
    # Cells per side of the occupancy grid over the cube [-radius, radius]^3 (authors: occ_grid_res: 32).
    occupancy_resolution: int = 32
    # A cell is occupied if density·step > this at any probed point and time (authors' occ_eval_fn returns
    # density·render_step_size, nerfacc's default occ_thre 0.01); as in nerfacc the threshold is lowered to
    # the mean of the positive values when that is smaller, so a faint field keeps its densest cells. Only 0
    # is conservative (keeps every cell with any density); 0.01 drops faint density, changing the image
    # slightly (each skipped sample has optical depth <= 0.01 at evaluation spacing, <= 0.02 with training's
    # stratified jitter, where the centre value is representative), as the authors' grid does.
    occupancy_threshold: float = 0.01
    # Cells added around occupied ones (a dilation): the grid probes only cell centres, so content in a
    # cell whose centre is empty is caught through its occupied neighbour.
    occupancy_dilation: int = 1

    def validate(self) -> None:
        """Raise ValueError naming the key for a value out of range (the Renderer calls it)."""
        if self.n_samples < 1:
            raise ValueError(f"renderer.n_samples must be >= 1, got {self.n_samples}")
        if not self.radius > 0:
            raise ValueError(f"renderer.radius must be > 0, got {self.radius}")
        if self.chunk_rays is not None and self.chunk_rays < 1:
            raise ValueError(
                f"renderer.chunk_rays must be >= 1 or None (no chunking), got {self.chunk_rays}"
            )
        if self.occupancy_resolution < 1:
            raise ValueError(
                f"renderer.occupancy_resolution must be >= 1, got {self.occupancy_resolution}"
            )
        if self.occupancy_threshold < 0:
            raise ValueError(
                f"renderer.occupancy_threshold must be >= 0, got {self.occupancy_threshold}"
            )
        if self.occupancy_dilation < 0:
            raise ValueError(f"renderer.occupancy_dilation must be >= 0, got {self.occupancy_dilation}")


def composite(
    density: torch.Tensor, rgb: torch.Tensor, t: torch.Tensor, far: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Paper Eq. 1 on R rays of N samples each.

    density: [R, N] σ_i >= 0; rgb: [R, N, 3]; t: [R, N] sample distances, increasing along each ray;
    far: [R] end of each ray's interval (the last sample's δ reaches it).
    Returns rgb [R, 3], opacity [R], depth [R] (Σ w_i t_i), weights [R, N].
    """
    delta = torch.cat([t[:, 1:] - t[:, :-1], far[:, None] - t[:, -1:]], dim=1)  # [R, N]
    tau = density * delta  # optical thickness of each interval
    alpha = 1.0 - torch.exp(-tau)
    # T_i = Π_{j<i}(1 − α_j) = exp(−Σ_{j<i} τ_j): the exclusive cumulative sum avoids cumprod's backward
    # dividing by (1 − α) and is the same quantity.
    tau_before = torch.cumsum(tau, dim=1) - tau
    weights = torch.exp(-tau_before) * alpha  # [R, N]
    return {
        "rgb": (weights[..., None] * rgb).sum(dim=1),
        "opacity": weights.sum(dim=1),
        "depth": (weights * t).sum(dim=1),
        "weights": weights,
    }


class OccupancyGrid:
    """Boolean grid over the cube [-half_size, half_size]^3: False marks cells known to be empty."""

    def __init__(self, resolution: int, half_size: float, device: torch.device | str = "cpu"):
        self.resolution = resolution
        self.half_size = half_size
        # Every cell occupied until the first update: the grid then changes nothing.
        self.occupied = torch.ones(resolution, resolution, resolution, dtype=torch.bool, device=device)

    def cell_centres(self) -> torch.Tensor:
        """[R, R, R, 3] world coordinates of the cell centres, indexed [ix, iy, iz]."""
        r = self.resolution
        axis = (torch.arange(r, device=self.occupied.device) + 0.5) / r * 2 * self.half_size - self.half_size
        return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)

    def lookup(self, points: torch.Tensor) -> torch.Tensor:
        """points: [N, 3] -> [N] bool, True where the containing cell is occupied (True outside the cube,
        where the grid knows nothing)."""
        r = self.resolution
        if self.occupied.device != points.device:
            self.occupied = self.occupied.to(points.device)
        index = torch.floor((points + self.half_size) / (2 * self.half_size) * r).long()
        inside = ((index >= 0) & (index < r)).all(dim=-1)
        index = index.clamp(0, r - 1)
        occupied = self.occupied[index[:, 0], index[:, 1], index[:, 2]]
        return occupied | ~inside

    @torch.no_grad()
    def update(self, field: Field, times: torch.Tensor, threshold: float, step: float, dilation: int) -> None:
        """Rebuild from the field's density at the cell centres at every time in times [T].

        occ = max over times of density·step per cell; a cell is occupied if occ > min(threshold, mean of
        the positive occ) (nerfacc OccGridEstimator._update's threshold), then the grid is grown by
        `dilation` cells. A field with no cell above that (an empty field) gives an all-occupied grid: an
        empty grid would skip every sample, so the field would get no gradient and could never re-grow.

        Unlike nerfacc there is no EMA of occ and no random point per cell, on purpose. nerfacc needs the
        EMA (decay 0.95) because after its warm-up each update re-probes only a random quarter of the cells,
        at one random point each, and the authors' 4D code at one random time: the EMA remembers what the
        other probes saw. Here every update probes every cell at every time the grid must cover, so the
        result is a function of the field alone (no RNG, no history: exact resume needs only this grid),
        cells that fill up again are re-occupied at the next update, and the dilation stands in for the
        random in-cell points (content off a cell's centre is caught through its occupied neighbour).
        """
        centres = self.cell_centres().reshape(-1, 3)
        occ = torch.zeros(centres.shape[0], device=centres.device)
        for time in torch.as_tensor(times).reshape(-1).tolist():  # a handful of times, each one vectorised
            density, _ = field(centres, torch.full((centres.shape[0],), time, device=centres.device))
            occ = torch.maximum(occ, density.reshape(-1).float() * step)
        positive = occ[occ > 0]
        occupied = occ > min(threshold, float(positive.mean())) if positive.numel() > 0 else occ > 0
        if not bool(occupied.any()):
            occupied = torch.ones_like(occupied)
        grid = occupied.reshape(1, 1, *self.occupied.shape).float()
        if dilation > 0:
            grid = torch.nn.functional.max_pool3d(
                grid, kernel_size=2 * dilation + 1, stride=1, padding=dilation
            )
        self.occupied = grid[0, 0] > 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"occupied": self.occupied.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        occupied = state["occupied"]
        if occupied.shape != self.occupied.shape:
            raise ValueError(
                f"occupancy grid state has shape {tuple(occupied.shape)}, this renderer's grid is "
                f"{tuple(self.occupied.shape)}: use the same RendererConfig.occupancy_resolution"
            )
        self.occupied = occupied.to(device=self.occupied.device, dtype=torch.bool)


class Renderer:
    """Volume renderer with dense stratified samples; its only state is the optional occupancy grid."""

    def __init__(self, cfg: RendererConfig | None = None):
        self.cfg = cfg if cfg is not None else RendererConfig()
        self.cfg.validate()
        self.occupancy: OccupancyGrid | None = None
        if self.cfg.occupancy_grid:
            self.occupancy = OccupancyGrid(self.cfg.occupancy_resolution, self.cfg.radius)

    def update_occupancy(
        self, field: Field, times: torch.Tensor, device: torch.device | str | None = None
    ) -> None:
        """Rebuild the occupancy grid from the field at times [T] (all the times the grid must cover),
        probing on `device` (default: where the grid is). step is the nominal sample spacing
        2·radius/n_samples (the longest chord over n_samples)."""
        if self.occupancy is None:
            raise ValueError("update_occupancy needs RendererConfig(occupancy_grid=True)")
        if device is not None:
            self.occupancy.occupied = self.occupancy.occupied.to(device)
        self.occupancy.update(
            field,
            times,
            threshold=self.cfg.occupancy_threshold,
            step=2 * self.cfg.radius / self.cfg.n_samples,
            dilation=self.cfg.occupancy_dilation,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The occupancy grid (empty without one): save it in checkpoints for an exact resume."""
        return self.occupancy.state_dict() if self.occupancy is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.occupancy is not None:
            self.occupancy.load_state_dict(state)
        elif state:
            raise ValueError("checkpoint has an occupancy grid but RendererConfig.occupancy_grid is False")

    def render(
        self,
        field: Field,
        cameras: Cameras,
        times: torch.Tensor,
        height: int,
        width: int,
        background: Background | None = None,
        generator: torch.Generator | None = None,
        train: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Render B views, view b at time times[b].

        field: callable (x [N, 3], t [N]) -> (density [N], rgb [N, 3]).
        cameras: B cameras; times: [B] in [0, 1], broadcast to every sample of view b.
        background: None (cfg.white_background ? white : black), a colour [3] or [B, 3], or a callable
            background(directions [N, 3] unit) -> rgb [N, 3]; composited as rgb + (1 − opacity)·bg.
        generator: the only source of the stratified jitter (train=True and cfg.stratified); None uses
            torch's global RNG. Jitter is drawn on the generator's device, for all rays at once, so the
            result does not depend on chunking.
        train: jitter samples (if cfg.stratified); False places them at the bin starts (deterministic).

        Returns dict(rgb [B, H, W, 3], opacity [B, H, W], depth [B, H, W] = Σ w_i t_i (unnormalised,
        0 where nothing is hit; t is distance from the camera centre), depth_normalized [B, H, W] =
        depth / opacity (expected distance of the visible surface; 0 where opacity is 0)), plus
        weights and t_samples [B, H, W, n_samples] if cfg.return_weights.
        """
        b = len(cameras)
        times = torch.as_tensor(times)
        if times.shape != (b,):
            raise ValueError(f"times must be [B]=[{b}] (one time per camera), got shape {tuple(times.shape)}")
        device = cameras.c2w.device
        origins, directions = get_rays(cameras, height, width)
        n_rays = b * height * width
        origins, directions = origins.reshape(n_rays, 3), directions.reshape(n_rays, 3)
        ray_times = times.to(device=device, dtype=origins.dtype).repeat_interleave(height * width)  # [R]
        near, far = ray_sphere_near_far(origins, directions, self.cfg.radius)

        n = self.cfg.n_samples
        if train and self.cfg.stratified:
            jitter_device = generator.device if generator is not None else torch.device("cpu")
            offsets = torch.rand(n_rays, n, generator=generator, device=jitter_device, dtype=origins.dtype)
            offsets = offsets.to(device)
        else:
            offsets = torch.zeros(n_rays, n, device=device, dtype=origins.dtype)
        bins = torch.arange(n, device=device, dtype=origins.dtype)
        t_samples = near[:, None] + (bins + offsets) * ((far - near) / n)[:, None]  # [R, N]

        chunk = self.cfg.chunk_rays or n_rays
        pieces = [
            self._march(
                field,
                origins[s : s + chunk],
                directions[s : s + chunk],
                ray_times[s : s + chunk],
                t_samples[s : s + chunk],
                far[s : s + chunk],
            )
            for s in range(0, n_rays, chunk)
        ]
        out = {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]}

        bg = self._background(background, directions, b, height * width)
        rgb = out["rgb"] + (1.0 - out["opacity"])[:, None] * bg
        opacity, depth = out["opacity"], out["depth"]
        # Division guarded only where nothing was hit (opacity == 0 implies depth == 0).
        depth_normalized = torch.where(opacity > 0, depth / torch.where(opacity > 0, opacity, 1.0), 0.0)
        result = {
            "rgb": rgb.reshape(b, height, width, 3),
            "opacity": opacity.reshape(b, height, width),
            "depth": depth.reshape(b, height, width),
            "depth_normalized": depth_normalized.reshape(b, height, width),
        }
        if self.cfg.return_weights:
            result["weights"] = out["weights"].reshape(b, height, width, n)
            result["t_samples"] = t_samples.reshape(b, height, width, n)
        return result

    def _march(
        self,
        field: Field,
        origins: torch.Tensor,
        directions: torch.Tensor,
        times: torch.Tensor,
        t_samples: torch.Tensor,
        far: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Query the field at every sample of R rays and composite. origins, directions: [R, 3]; times: [R];
        t_samples: [R, N]; far: [R]."""
        r, n = t_samples.shape
        points = (origins[:, None, :] + t_samples[..., None] * directions[:, None, :]).reshape(r * n, 3)
        sample_times = times.repeat_interleave(n)
        keep = self.occupancy.lookup(points) if self.occupancy is not None else None
        if keep is None or bool(keep.all()):
            density, rgb = _query(field, points, sample_times)
        else:
            # Empty cells: density 0 (so α = 0 and the colour is irrelevant) without calling the field.
            index = keep.nonzero().squeeze(1)
            kept_density, kept_rgb = _query(field, points[index], sample_times[index])
            density = points.new_zeros(r * n).index_put((index,), kept_density.to(points.dtype))
            rgb = points.new_zeros(r * n, 3).index_put((index,), kept_rgb.to(points.dtype))
        return composite(density.reshape(r, n), rgb.reshape(r, n, 3), t_samples, far)

    def _background(
        self, background: Background | None, directions: torch.Tensor, b: int, rays_per_view: int
    ) -> torch.Tensor:
        """Background colour of every ray: [R, 3]."""
        n_rays = directions.shape[0]
        if background is None:
            value = 1.0 if self.cfg.white_background else 0.0
            return torch.full((n_rays, 3), value, device=directions.device, dtype=directions.dtype)
        if callable(background) and not isinstance(background, torch.Tensor):
            colours = background(directions)
            if colours.shape != (n_rays, 3):
                raise ValueError(
                    f"background(directions [N,3]) must return rgb [N,3] with N={n_rays}, "
                    f"got {tuple(colours.shape)}"
                )
            return colours
        if not isinstance(background, torch.Tensor):
            raise TypeError(
                "background must be None, a tensor [3] or [B,3], or a callable, "
                f"got {type(background).__name__}"
            )
        colour = background.to(device=directions.device, dtype=directions.dtype)
        if colour.shape == (3,):
            return colour.expand(n_rays, 3)
        if colour.shape == (b, 3):
            return colour.repeat_interleave(rays_per_view, dim=0)
        raise ValueError(f"background tensor must be [3] or [B,3]=[{b},3], got {tuple(colour.shape)}")


def _query(field: Field, points: torch.Tensor, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """field(points [N, 3], times [N]) with its output shapes checked."""
    n = points.shape[0]
    density, rgb = field(points, times)
    if density.shape != (n,) or rgb.shape != (n, 3):
        raise ValueError(
            f"field(x [N,3], t [N]) must return (density [N], rgb [N,3]) with N={n}; "
            f"got density {tuple(density.shape)}, rgb {tuple(rgb.shape)}"
        )
    return density, rgb
