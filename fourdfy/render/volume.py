"""Volume rendering of a 4D field (paper Eq. 1): NeRF quadrature along rays through a bounding sphere.

For a ray with samples at distances t_0 < ... < t_{N-1} (between the sphere's near and far):
    δ_i = t_{i+1} − t_i (δ_{N−1} = far − t_{N−1}),  α_i = 1 − exp(−σ_i δ_i),
    T_i = Π_{j<i} (1 − α_j) = exp(−Σ_{j<i} σ_j δ_j),  w_i = T_i α_i,
    rgb = Σ w_i c_i,  opacity = Σ w_i,  depth = Σ w_i t_i.
The paper writes δ_i = ‖μ_i − μ_{i+1}‖; with unit ray directions that is t_{i+1} − t_i.

Two ways to place the samples (RendererConfig.marching):
- ``uniform``: n_samples stratified bins between the bounding sphere's near and far, every sample evaluated
  (skipping only cells an optional occupancy grid marks empty). Dense [R, N] tensors.
- ``authors``: the authors' nerfacc marching (threestudio/models/renderers/nerf_volume_renderer.py with
  nerfacc 0.5.2's OccGridEstimator): intervals of fixed length step = 1.732·2·r/num_samples_per_ray on a
  lattice t_k = u·step + k·step from the camera (u ~ U[0, 1) per ray in training, 0 in evaluation), kept
  where the interval's midpoint lies in the box [-r, r]³ and in an occupied cell of an EMA occupancy grid;
  then the field's density at the midpoints (no grad) drops samples with α < alpha_threshold or behind
  transmittance < early_stop_eps, and only the rest are evaluated with grad and composited (δ_i = step,
  sample position and depth t_i at the midpoint). Packed [S] tensors (see composite_packed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field

import torch

from fourdfy.enums import StrChoice
from fourdfy.render.cameras import Cameras
from fourdfy.render.rays import get_rays, ray_box_near_far, ray_sphere_near_far

Field = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""field(x [N, 3] world coords, t [N] in [0, 1]) -> (density [N] >= 0, rgb [N, 3] in [0, 1])."""

Background = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
"""A solid colour [3] or per-view colours [B, 3], or background(directions [N, 3]) -> rgb [N, 3]."""


class MarchingMode(StrChoice):
    """Where the samples of a ray go (see the module docstring)."""

    uniform = "uniform"  # n_samples stratified bins through the bounding sphere, all evaluated (ours)
    authors = "authors"  # fixed step through the box, grid skipping, α pruning (the authors' nerfacc marching)


# The authors' constant: render_step_size = 1.732·2·radius/num_samples_per_ray
# (threestudio/models/renderers/nerf_volume_renderer.py, NeRFVolumeRenderer.configure), 1.732 ≈ √3 as written.
AUTHORS_SQRT3 = 1.732


@dataclass
class AuthorsMarchingConfig:
    """Settings of marching=authors only (nerfacc 0.5.2 OccGridEstimator as the authors call it)."""

    # step = 1.732·2·box_radius/num_samples_per_ray (authors: renderer.num_samples_per_ray: 512), ≈ 296 samples
    # on a central chord of the box.
    num_samples_per_ray: int = 512
    # Half side of the box [-r, r]³ rays are marched through and the grid covers (authors: renderer.radius =
    # geometry.radius: 1.0, the renderer's bbox and the estimator's roi_aabb).
    box_radius: float = 1.0
    # Samples with α = 1 − exp(−σ·step) below this are dropped (authors: alpha_thre=0.01 with
    # prune_alpha_threshold: true); nerfacc lowers it to the grid's mean value when that is smaller.
    alpha_threshold: float = 0.01
    # Samples where the transmittance of the samples before them is below this are dropped (nerfacc
    # OccGridEstimator.sampling early_stop_eps default 1e-4; the authors do not pass it).
    early_stop_eps: float = 1e-4
    # Cells per side of the grid over the box (authors: renderer.occ_grid_res: 32, levels=1).
    grid_resolution: int = 32
    # A cell is occupied if its value > min(this, mean of all values) (nerfacc update_every_n_steps occ_thre 0.01).
    grid_threshold: float = 0.01
    # Probed cells: value <- max(value·decay, density·step) (nerfacc update_every_n_steps ema_decay 0.95).
    grid_ema_decay: float = 0.95
    # Updates at iteration < this probe every cell; later ones a random quarter of the cells plus up to as
    # many occupied ones (nerfacc update_every_n_steps warmup_steps 256; the iteration is the stage's own:
    # the authors launch each stage anew, so their global_step restarts at 0).
    grid_warmup: int = 256

    def validate(self) -> None:
        """Raise ValueError naming the key for a value out of range."""
        if self.num_samples_per_ray < 1:
            raise ValueError(f"renderer.authors.num_samples_per_ray must be >= 1, got {self.num_samples_per_ray}")
        if not self.box_radius > 0:
            raise ValueError(f"renderer.authors.box_radius must be > 0, got {self.box_radius}")
        if not 0 <= self.alpha_threshold < 1:
            raise ValueError(f"renderer.authors.alpha_threshold must be in [0, 1), got {self.alpha_threshold}")
        if not 0 <= self.early_stop_eps < 1:
            raise ValueError(f"renderer.authors.early_stop_eps must be in [0, 1), got {self.early_stop_eps}")
        if self.grid_resolution < 1:
            raise ValueError(f"renderer.authors.grid_resolution must be >= 1, got {self.grid_resolution}")
        if self.grid_threshold < 0:
            raise ValueError(f"renderer.authors.grid_threshold must be >= 0, got {self.grid_threshold}")
        if not 0 <= self.grid_ema_decay <= 1:
            raise ValueError(f"renderer.authors.grid_ema_decay must be in [0, 1], got {self.grid_ema_decay}")
        if self.grid_warmup < 0:
            raise ValueError(f"renderer.authors.grid_warmup must be >= 0, got {self.grid_warmup}")

    @property
    def step(self) -> float:
        """The authors' render_step_size."""
        return AUTHORS_SQRT3 * 2 * self.box_radius / self.num_samples_per_ray


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
    # Also return per-sample weights [B, H, W, n_samples] and sample distances t [B, H, W, n_samples]
    # (marching=authors: packed weights [S], t_samples [S] and ray_indices [S] into the B·H·W rays).
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
    # uniform: the keys above (n_samples, radius, occupancy_resolution/threshold/dilation). authors: the
    # authors' marching with the keys of `authors` (stratified, chunk_rays, white_background, return_weights
    # and occupancy_grid, which switches its EMA grid on, are shared).
    marching: MarchingMode = MarchingMode.uniform
    # Settings of marching=authors (read only then).
    authors: AuthorsMarchingConfig = dc_field(default_factory=AuthorsMarchingConfig)

    def validate(self) -> None:
        """Raise ValueError naming the key for a value out of range (the Renderer calls it)."""
        self.authors.validate()
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


def composite_packed(
    density: torch.Tensor, rgb: torch.Tensor, t: torch.Tensor, delta: float, ray_indices: torch.Tensor,
    n_rays: int,
) -> dict[str, torch.Tensor]:
    """Paper Eq. 1 on S samples packed ray after ray, every interval of length delta.

    density: [S] σ_i >= 0; rgb: [S, 3]; t: [S] sample distances; ray_indices: [S] int64 in [0, n_rays),
    non-decreasing (a ray's samples are contiguous and in the order of t). Returns rgb [n_rays, 3],
    opacity [n_rays], depth [n_rays] (Σ w_i t_i), weights [S]; rays without samples get 0.

    Packed rather than padded: after grid skipping and α pruning the kept samples per ray range from 0 to
    hundreds, so a padded [R, max] layout would hold mostly padding. The exclusive cumulative optical depth
    within each ray is a global cumulative sum minus its value at the ray's first sample, in float64: over
    millions of samples a float32 running sum would lose the small τ of later rays to cancellation.
    """
    tau = density * delta
    alpha = 1.0 - torch.exp(-tau)
    tau_before = _exclusive_segment_cumsum(tau, ray_indices, n_rays).to(tau.dtype)
    weights = torch.exp(-tau_before) * alpha  # [S]
    zeros = density.new_zeros(n_rays)
    return {
        "rgb": density.new_zeros(n_rays, 3).index_add(0, ray_indices, weights[:, None] * rgb),
        "opacity": zeros.index_add(0, ray_indices, weights),
        "depth": zeros.index_add(0, ray_indices, weights * t),
        "weights": weights,
    }


def _exclusive_segment_cumsum(values: torch.Tensor, ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """[S] -> [S] float64: Σ of the earlier values of the same ray (ray_indices non-decreasing)."""
    v = values.double()
    exclusive = torch.cumsum(v, dim=0) - v
    counts = torch.bincount(ray_indices, minlength=n_rays)
    first = torch.cumsum(counts, dim=0) - counts  # [n_rays] position of each ray's first sample
    return exclusive - exclusive[first[ray_indices]]


def _cell_index(points: torch.Tensor, half_size: float, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """points [N, 3] -> (cell index [N, 3] clamped into the grid over [-half_size, half_size]^3, inside [N])."""
    index = torch.floor((points + half_size) / (2 * half_size) * resolution).long()
    inside = ((index >= 0) & (index < resolution)).all(dim=-1)
    return index.clamp(0, resolution - 1), inside


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
        if self.occupied.device != points.device:
            self.occupied = self.occupied.to(points.device)
        index, inside = _cell_index(points, self.half_size, self.resolution)
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


class EmaOccupancyGrid:
    """The authors' occupancy grid (nerfacc 0.5.2 OccGridEstimator, levels=1) over [-half_size, half_size]^3.

    values [R, R, R]: an exponential moving maximum of density·step probed in each cell; occupied: values >
    min(threshold, mean of values). Before the first update every cell counts as occupied (nerfacc starts all
    empty but the authors update at step 0, before the first render; the trainer must too).
    """

    def __init__(self, resolution: int, half_size: float, device: torch.device | str = "cpu"):
        self.resolution = resolution
        self.half_size = half_size
        self.values = torch.zeros(resolution, resolution, resolution, device=device)
        self.occupied = torch.ones(resolution, resolution, resolution, dtype=torch.bool, device=device)

    def to(self, device: torch.device | str) -> None:
        self.values = self.values.to(device)
        self.occupied = self.occupied.to(device)

    def lookup(self, points: torch.Tensor) -> torch.Tensor:
        """points: [N, 3] (inside the cube up to round-off: clamped into it) -> [N] bool occupied."""
        if self.occupied.device != points.device:
            self.to(points.device)
        index, _ = _cell_index(points, self.half_size, self.resolution)
        return self.occupied[index[:, 0], index[:, 1], index[:, 2]]

    @torch.no_grad()
    def update(
        self,
        field: Field,
        times: torch.Tensor,
        iteration: int,
        step: float,
        threshold: float,
        decay: float,
        warmup: int,
        generator: torch.Generator | None = None,
    ) -> None:
        """One EMA update (nerfacc OccGridEstimator._update, what update_every_n_steps calls every n steps).

        Probed cells: all while iteration < warmup, else R³//4 cells drawn uniformly (with repetition) plus
        R³//4 drawn from the occupied ones (all of them if fewer). Each probe is one uniform point in its
        cell, at one time drawn uniformly in [min(times), max(times)] for the whole update (the authors'
        occ_eval_fn sets one random frame time, torch.rand(1), per update; the trainer's times span what the
        stage renders). value <- max(value·decay, density·step) for the probed cells, others unchanged; a
        cell probed twice takes the larger probe (nerfacc's comment: "suppose to use scatter max"; its
        indexed assignment keeps an arbitrary one). Then occupied = value > min(threshold, mean value); a
        grid with no occupied cell (only an identically zero field) is made all occupied instead, as the
        uniform grid does, so the field keeps its gradient.

        Random numbers come from `generator` (CPU or the grid's device; None: torch's global RNG), drawn on
        its device, so an update is reproducible from the generator's state.
        """
        r = self.resolution
        n_cells = r**3
        device = self.values.device
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if iteration < warmup:
            indices = torch.arange(n_cells, device=gen_device)
        else:
            quarter = n_cells // 4
            uniform = torch.randint(n_cells, (quarter,), generator=generator, device=gen_device)
            occupied = self.occupied.reshape(-1).nonzero().squeeze(1).to(gen_device)
            if quarter < len(occupied):
                occupied = occupied[torch.randint(len(occupied), (quarter,), generator=generator, device=gen_device)]
            indices = torch.cat([uniform, occupied])
        coords = torch.stack([indices // (r * r), (indices // r) % r, indices % r], dim=-1)  # [P, 3] (ix, iy, iz)
        jitter = torch.rand(len(indices), 3, generator=generator, device=gen_device)
        points = ((coords + jitter) / r * 2 * self.half_size - self.half_size).to(device)
        times = torch.as_tensor(times).reshape(-1).double()
        lo, hi = float(times.min()), float(times.max())
        time = lo + (hi - lo) * float(torch.rand((), generator=generator, device=gen_device, dtype=torch.float64))
        density, _ = field(points, torch.full((len(points),), time, device=device))
        occ = density.reshape(-1).float() * step
        indices = indices.to(device)
        values = self.values.reshape(-1).clone()
        values[indices] = values[indices] * decay
        values = values.scatter_reduce(0, indices, occ, reduce="amax", include_self=True)
        occupied = values > min(threshold, float(values.mean()))
        if not bool(occupied.any()):
            occupied = torch.ones_like(occupied)
        self.values = values.reshape(r, r, r)
        self.occupied = occupied.reshape(r, r, r)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"occupied": self.occupied.clone(), "occupancy_values": self.values.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "occupancy_values" not in state:
            raise ValueError(
                "checkpoint's occupancy grid has no EMA values (saved with renderer.marching=uniform): resume "
                "with the renderer.marching it was saved with"
            )
        values, occupied = state["occupancy_values"], state["occupied"]
        if values.shape != self.values.shape or occupied.shape != self.occupied.shape:
            raise ValueError(
                f"occupancy grid state has shape {tuple(values.shape)}, this renderer's grid is "
                f"{tuple(self.values.shape)}: use the same renderer.authors.grid_resolution"
            )
        self.values = values.to(device=self.values.device, dtype=torch.float32)
        self.occupied = occupied.to(device=self.occupied.device, dtype=torch.bool)


class Renderer:
    """Volume renderer (uniform or the authors' marching); its only state is the optional occupancy grid."""

    def __init__(self, cfg: RendererConfig | None = None):
        self.cfg = cfg if cfg is not None else RendererConfig()
        self.cfg.validate()
        self.occupancy: OccupancyGrid | EmaOccupancyGrid | None = None
        if self.cfg.occupancy_grid and self.cfg.marching == MarchingMode.authors:
            self.occupancy = EmaOccupancyGrid(self.cfg.authors.grid_resolution, self.cfg.authors.box_radius)
        elif self.cfg.occupancy_grid:
            self.occupancy = OccupancyGrid(self.cfg.occupancy_resolution, self.cfg.radius)

    def update_occupancy(
        self,
        field: Field,
        times: torch.Tensor,
        device: torch.device | str | None = None,
        iteration: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Update the occupancy grid from the field at times [T] (all the times the grid must cover),
        probing on `device` (default: where the grid is).

        uniform: a rebuild from every cell centre at every time; step is the nominal sample spacing
        2·radius/n_samples (the longest chord over n_samples); iteration and generator are not used.
        authors: one EMA update (EmaOccupancyGrid.update) with step = the authors' render_step_size;
        `iteration` (the stage's own iteration: it picks warm-up or sampled cells) is required, and the
        random cells, points and time come from `generator`. The authors update every 16 iterations from
        iteration 0 (nerfacc update_every_n_steps n=16), before that iteration's render.
        """
        if self.occupancy is None:
            raise ValueError("update_occupancy needs RendererConfig(occupancy_grid=True)")
        if isinstance(self.occupancy, EmaOccupancyGrid):
            if iteration is None:
                raise ValueError(
                    "renderer.marching=authors: update_occupancy needs iteration= (the stage's iteration; "
                    "below renderer.authors.grid_warmup every cell is probed)"
                )
            if device is not None:
                self.occupancy.to(device)
            a = self.cfg.authors
            self.occupancy.update(field, times, iteration, step=a.step, threshold=a.grid_threshold,
                                  decay=a.grid_ema_decay, warmup=a.grid_warmup, generator=generator)
            return
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
        if isinstance(self.occupancy, OccupancyGrid) and "occupancy_values" in state:
            raise ValueError(
                "checkpoint's occupancy grid is the authors' EMA grid (renderer.marching=authors): resume with "
                "the renderer.marching it was saved with"
            )
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
        aux: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Render B views, view b at time times[b].

        field: callable (x [N, 3], t [N]) -> (density [N], rgb [N, 3]).
        cameras: B cameras; times: [B] in [0, 1], broadcast to every sample of view b.
        background: None (cfg.white_background ? white : black), a colour [3] or [B, 3], or a callable
            background(directions [N, 3] unit) -> rgb [N, 3]; composited as rgb + (1 − opacity)·bg.
        generator: the only source of the stratified jitter (train=True and cfg.stratified); None uses
            torch's global RNG. Jitter is drawn on the generator's device, for all rays at once, so the
            result does not depend on chunking.
        train: jitter samples (if cfg.stratified); False places them at the bin starts (deterministic;
            marching=authors: one offset per ray, the lattice then starts at the camera centre).
        aux: optional (x [N, 3], t [N]) -> [N, C], composited with the same weights as the colour into
            out["aux"] [B, H, W, C] (no background): the authors' rendered deformation map.

        Returns dict(rgb [B, H, W, 3], opacity [B, H, W], depth [B, H, W] = Σ w_i t_i (unnormalised,
        0 where nothing is hit; t is distance from the camera centre), depth_normalized [B, H, W] =
        depth / opacity (expected distance of the visible surface; 0 where opacity is 0)), plus
        weights and t_samples [B, H, W, n_samples] if cfg.return_weights (marching=authors: packed
        weights, t_samples and ray_indices [S], ray_indices into the B·H·W rays in row-major order).
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
        if self.cfg.marching == MarchingMode.authors:
            out = self._render_authors(field, origins, directions, ray_times, generator, train, aux)
            return self._finish(out, background, directions, b, height, width)
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
                aux,
            )
            for s in range(0, n_rays, chunk)
        ]
        out = {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]}
        if self.cfg.return_weights:
            out["weights"] = out["weights"].reshape(b, height, width, n)
            out["t_samples"] = t_samples.reshape(b, height, width, n)
        else:
            del out["weights"]
        return self._finish(out, background, directions, b, height, width)

    def _finish(
        self, out: dict[str, torch.Tensor], background: Background | None, directions: torch.Tensor, b: int,
        height: int, width: int,
    ) -> dict[str, torch.Tensor]:
        """Per-ray rgb [R, 3], opacity [R], depth [R] (+ extras passed through) -> the render's dict."""
        bg = self._background(background, directions, b, height * width)
        rgb = out.pop("rgb") + (1.0 - out["opacity"])[:, None] * bg
        opacity, depth = out.pop("opacity"), out.pop("depth")
        if "aux" in out:
            out["aux"] = out["aux"].reshape(b, height, width, -1)
        # Division guarded only where nothing was hit (opacity == 0 implies depth == 0).
        depth_normalized = torch.where(opacity > 0, depth / torch.where(opacity > 0, opacity, 1.0), 0.0)
        return {
            "rgb": rgb.reshape(b, height, width, 3),
            "opacity": opacity.reshape(b, height, width),
            "depth": depth.reshape(b, height, width),
            "depth_normalized": depth_normalized.reshape(b, height, width),
            **out,
        }

    def alpha_threshold(self) -> float:
        """The α below which marching=authors drops samples: renderer.authors.alpha_threshold, lowered to the
        grid's mean value when that is smaller (nerfacc OccGridEstimator.sampling: alpha_thre = min(alpha_thre,
        occs.mean())), so 0 before the grid's first update."""
        threshold = self.cfg.authors.alpha_threshold
        if isinstance(self.occupancy, EmaOccupancyGrid):
            threshold = min(threshold, float(self.occupancy.values.mean()))
        return threshold

    def _render_authors(
        self,
        field: Field,
        origins: torch.Tensor,
        directions: torch.Tensor,
        ray_times: torch.Tensor,
        generator: torch.Generator | None,
        train: bool,
        aux: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """marching=authors on R rays: origins, directions [R, 3], ray_times [R] -> rgb [R, 3], opacity [R],
        depth [R] (+ aux [R, C] with `aux`; + packed weights, t_samples, ray_indices [S] if cfg.return_weights)."""
        n_rays = origins.shape[0]
        step = self.cfg.authors.step
        # One lattice offset per ray (nerfacc: near_planes += rand·render_step_size when stratified), drawn for
        # all rays at once on the generator's device, so chunking does not change it.
        if train and self.cfg.stratified:
            jitter_device = generator.device if generator is not None else torch.device("cpu")
            offsets = torch.rand(n_rays, generator=generator, device=jitter_device, dtype=origins.dtype)
            offsets = offsets.to(origins.device) * step
        else:
            offsets = origins.new_zeros(n_rays)
        alpha_threshold = self.alpha_threshold()
        chunk = self.cfg.chunk_rays or n_rays
        pieces = [
            self._march_authors(field, origins[s : s + chunk], directions[s : s + chunk],
                                ray_times[s : s + chunk], offsets[s : s + chunk], alpha_threshold, aux)
            for s in range(0, n_rays, chunk)
        ]
        keys = ("rgb", "opacity", "depth", "aux") if aux is not None else ("rgb", "opacity", "depth")
        out = {key: torch.cat([p[key] for p in pieces]) for key in keys}
        if self.cfg.return_weights:
            starts = range(0, n_rays, chunk)
            out["weights"] = torch.cat([p["weights"] for p in pieces])
            out["t_samples"] = torch.cat([p["t_samples"] for p in pieces])
            out["ray_indices"] = torch.cat([p["ray_indices"] + s for p, s in zip(pieces, starts, strict=True)])
        return out

    def _march_authors(
        self,
        field: Field,
        origins: torch.Tensor,
        directions: torch.Tensor,
        times: torch.Tensor,
        offsets: torch.Tensor,
        alpha_threshold: float,
        aux: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One chunk of marching=authors. origins, directions: [R, 3]; times, offsets (lattice start) [R].

        Sample k of a ray is the interval [o + k·step, o + (k+1)·step], taken when its midpoint lies in
        [max(box entry, o), box exit) (nerfacc traverse_grids: march until t_mid passes the entry, stop when it
        reaches the exit) and in an occupied cell."""
        a = self.cfg.authors
        step = a.step
        r = origins.shape[0]
        device = origins.device
        near, far = ray_box_near_far(origins, directions, a.box_radius)
        start = torch.maximum(near, offsets)
        # k0: first k with o + (k + ½)·step >= start; k1: last k with o + (k + ½)·step < far.
        k0 = torch.ceil((start - offsets) / step - 0.5)
        k1 = torch.ceil((far - offsets) / step - 0.5) - 1
        counts = torch.where(far > start, (k1 - k0 + 1).clamp(min=0), torch.zeros_like(k0)).long()
        ray_indices = torch.repeat_interleave(torch.arange(r, device=device), counts)  # [S] candidates
        first = torch.cumsum(counts, dim=0) - counts
        k = k0.long()[ray_indices] + torch.arange(len(ray_indices), device=device) - first[ray_indices]
        t_mid = offsets[ray_indices] + (k.to(origins.dtype) + 0.5) * step
        points = origins[ray_indices] + t_mid[:, None] * directions[ray_indices]
        if self.occupancy is not None:  # empty cells: skipped without calling the field
            keep = self.occupancy.lookup(points)
            ray_indices, t_mid, points = ray_indices[keep], t_mid[keep], points[keep]
        sample_times = times[ray_indices]
        if (alpha_threshold > 0 or a.early_stop_eps > 0) and len(points) > 0:
            # nerfacc render_visibility_from_density: transmittance over all marched samples, then the tests.
            with torch.no_grad():
                sigma, _ = _query(field, points, sample_times)
                tau = sigma.to(origins.dtype) * step
                alpha = 1.0 - torch.exp(-tau)
                transmittance = torch.exp(-_exclusive_segment_cumsum(tau, ray_indices, r)).to(origins.dtype)
                keep = transmittance >= a.early_stop_eps
                if alpha_threshold > 0:
                    keep &= alpha >= alpha_threshold
            ray_indices, t_mid, points, sample_times = (
                ray_indices[keep], t_mid[keep], points[keep], sample_times[keep]
            )
        if len(points) > 0:
            density, rgb = _query(field, points, sample_times)
            density, rgb = density.to(origins.dtype), rgb.to(origins.dtype)
        else:  # nothing to evaluate (every ray empty): a field call on no points is not asked of the field
            density, rgb = origins.new_zeros(0), origins.new_zeros(0, 3)
        out = composite_packed(density, rgb, t_mid, step, ray_indices, r)
        out["t_samples"], out["ray_indices"] = t_mid, ray_indices
        if aux is not None:
            values = aux(points, sample_times).to(origins.dtype) if len(points) else origins.new_zeros(0, 3)
            weighted = out["weights"][:, None] * values
            out["aux"] = values.new_zeros(r, values.shape[-1]).index_add(0, ray_indices, weighted)
        return out

    def _march(
        self,
        field: Field,
        origins: torch.Tensor,
        directions: torch.Tensor,
        times: torch.Tensor,
        t_samples: torch.Tensor,
        far: torch.Tensor,
        aux: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Query the field at every sample of R rays and composite. origins, directions: [R, 3]; times: [R];
        t_samples: [R, N]; far: [R]; aux: see render (composited into out["aux"] [R, C])."""
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
        out = composite(density.reshape(r, n), rgb.reshape(r, n, 3), t_samples, far)
        if aux is not None:  # at every sample: empty cells have weight 0, so they add nothing
            values = aux(points, sample_times).to(points.dtype).reshape(r, n, -1)
            out["aux"] = (out["weights"][..., None] * values).sum(dim=1)
        return out

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
