"""Activation checkpointing of Field4D (field.checkpoint_chunk).

Checked: outputs and gradients (grids, heads, x) equal the plain forward's for the hash-grid, dense and
HexPlane fields (N a non-multiple of the chunk, N below the chunk); the gradients also against central
differences; a frozen dynamic grid gets no gradient; no checkpoint runs without a graph; blob_std is that
of the forward; the config is validated and passed through; and the memory kept between forward and
backward, measured through torch's CPU allocator, drops to the outputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

import fourdfy.fields.field4d as field4d_module
from bench.field_memory import profiled_memory
from fourdfy.build import build_field
from fourdfy.clock import Clock, LinearRamp, Scheduled, StageSchedule
from fourdfy.config import RunConfig
from fourdfy.fields.dense import DenseGridConfig
from fourdfy.fields.field4d import Field4D, FieldConfig
from fourdfy.fields.hashgrid import HashGridConfig
from fourdfy.fields.hexplane import HexPlaneConfig
from fourdfy.render.trajectories import orbit_cameras
from fourdfy.render.volume import Renderer, RendererConfig

pytestmark = pytest.mark.numerics  # floats against references: .ci/run reruns these on other SIMD kernels

SMALL_GRID = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                            per_level_scale=2.0)
SMALL_HEX = HexPlaneConfig(resolutions=[8, 16], time_resolution=8, n_features=4)
SMALL_DENSE = DenseGridConfig(resolutions=[6, 12], n_features=4, dynamic_resolutions=[4, 8], time_resolution=8)
KINDS = ("hashgrid", "dense", "hexplane")
CHUNK = 300
N_TIMES = 4  # distinct frame times of the samples (a training batch has one time per view)


def _field(kind: str, chunk: int | None, dtype: torch.dtype = torch.float64,
           blob_std: Scheduled | None = None) -> Field4D:
    """A tiny field of `kind` with order-1 random parameters (same values for every `chunk`)."""
    torch.manual_seed(0)
    cfg = FieldConfig(kind=kind, static_grid=SMALL_GRID, dynamic_grid=SMALL_GRID, hexplane=SMALL_HEX,
                      dense=SMALL_DENSE, checkpoint_chunk=chunk)
    field, _ = build_field(cfg, blob_std=blob_std)
    # The defaults are ~1e-4 (grids) or exactly 0 (time planes): features and their gradients would nearly
    # vanish and make the comparison weak, so every parameter is redrawn at order 1.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in field.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return field.to(dtype)


def _inputs(n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """x: [n,3] in [-1.2,1.2]^3 (some outside the box), t: [n] on N_TIMES frame times, loss weights."""
    gen = torch.Generator().manual_seed(n)
    x = (torch.rand(n, 3, generator=gen, dtype=dtype) * 2.4 - 1.2)
    t = torch.randint(0, N_TIMES, (n,), generator=gen).to(dtype) / (N_TIMES - 1)
    return x, t, torch.randn(n, generator=gen, dtype=dtype), torch.randn(n, 3, generator=gen, dtype=dtype)


def _loss(field: Field4D, x: torch.Tensor, t: torch.Tensor, wd: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
    density, rgb = field(x, t)
    return (density * wd).sum() + (rgb * wc).sum()


def _run(field: Field4D, n: int, dtype: torch.dtype = torch.float64, x_grad: bool = True) -> dict[str, torch.Tensor]:
    """Outputs, x's gradient and every parameter's gradient of one forward + backward."""
    x, t, wd, wc = _inputs(n, dtype)
    x.requires_grad_(x_grad)
    field.zero_grad(set_to_none=True)
    density, rgb = field(x, t)
    ((density * wd).sum() + (rgb * wc).sum()).backward()
    out = {"density": density.detach(), "rgb": rgb.detach()}
    if x_grad:
        out["x"] = x.grad
    out.update({name: p.grad for name, p in field.named_parameters() if p.grad is not None})
    return out


@pytest.fixture
def checkpoint_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the field's calls of torch.utils.checkpoint.checkpoint (one entry of chunk size per call)."""
    calls: list[int] = []
    real = field4d_module.checkpoint

    def spy(fn, x, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(x.shape[0])
        return real(fn, x, *args, **kwargs)

    monkeypatch.setattr(field4d_module, "checkpoint", spy)
    return calls


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1000, 200])  # 1000 = 3 chunks of 300 + 100; 200 < one chunk
def test_checkpointed_outputs_and_gradients_equal_the_plain_ones(kind: str, n: int, checkpoint_calls) -> None:
    plain = _run(_field(kind, None), n)
    assert checkpoint_calls == []
    ckpt = _run(_field(kind, CHUNK), n)
    assert checkpoint_calls == [min(CHUNK, n - s) for s in range(0, n, CHUNK)]  # really chunked
    assert set(ckpt) == set(plain) and len(plain) > 3  # outputs, x and every parameter
    for name, value in plain.items():
        assert value.abs().sum() > 0, f"{name}: a zero gradient would make the comparison vacuous"
        if n <= CHUNK:  # one chunk: the same operations on the same tensors -> bitwise
            assert torch.equal(ckpt[name], value), name
        else:  # per-chunk parameter gradients are summed in another order: float64 round-off only
            torch.testing.assert_close(ckpt[name], value, rtol=1e-12, atol=1e-12, msg=name)


def test_float32_hashgrid_equal_to_round_off_and_bitwise_in_one_chunk() -> None:
    plain = _run(_field("hashgrid", None, torch.float32), 1000, torch.float32)
    ckpt = _run(_field("hashgrid", CHUNK, torch.float32), 1000, torch.float32)
    for name, value in plain.items():
        torch.testing.assert_close(ckpt[name], value, msg=name)  # float32 defaults: rtol 1.3e-6, atol 1e-5
    one_chunk = _run(_field("hashgrid", 4096, torch.float32), 1000, torch.float32)
    for name, value in plain.items():
        assert torch.equal(one_chunk[name], value), name


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_gradients_match_central_differences(kind: str) -> None:
    """d/dε L(θ + εv, x + εu) at ε = 0 equals <∇θ L, v> + <∇x L, u> (independent of autograd)."""
    field = _field(kind, CHUNK)
    x, t, wd, wc = _inputs(700)
    x.requires_grad_(True)
    _loss(field, x, t, wd, wc).backward()
    gen = torch.Generator().manual_seed(7)
    params = list(field.parameters())
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    u = torch.randn(x.shape, generator=gen, dtype=x.dtype) * 0.1
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, v, strict=True)) + float((x.grad * u).sum())
    # Small enough that no ReLU / interpolation-cell kink lies within ±eps of these samples (at 1e-6 the
    # HexPlane field's directional difference is off by 4e-4, from a kink); float64 round-off ~1e-9 here.
    eps = 1e-7
    values = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for p, d in zip(params, v, strict=True):
                p.add_(sign * eps * d)
            values.append(float(_loss(field, x + sign * eps * u, t, wd, wc)))
            for p, d in zip(params, v, strict=True):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_dynamic_grid_gets_no_gradient(kind: str, checkpoint_calls) -> None:
    fields = {chunk: _field(kind, chunk) for chunk in (None, CHUNK)}
    for field in fields.values():
        for p in field.param_groups()["dynamic"]:
            p.requires_grad_(False)  # stages 1-2 of the hybrid schedule
    plain = _run(fields[None], 1000, x_grad=False)  # x needs no gradient in training
    ckpt = _run(fields[CHUNK], 1000, x_grad=False)
    assert len(checkpoint_calls) == math.ceil(1000 / CHUNK)
    assert all(p.grad is None for p in fields[CHUNK].param_groups()["dynamic"])
    assert set(ckpt) == set(plain)
    for name in ("static", "heads"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fields[CHUNK].param_groups()[name])
    for name, value in plain.items():
        torch.testing.assert_close(ckpt[name], value, rtol=1e-12, atol=1e-12, msg=name)


def test_renderer_with_checkpointed_field_matches_plain() -> None:
    """Through the renderer (its own ray chunks), both grids get the plain gradients; frozen: none."""
    renderer = Renderer(RendererConfig(n_samples=16, chunk_rays=40))
    cams, times = orbit_cameras(2), torch.tensor([0.1, 0.8])
    grads = {}
    for chunk in (None, 256):
        field = _field("hashgrid", chunk, torch.float32)
        rgb = renderer.render(field, cams, times, 8, 8, train=False)["rgb"]
        rgb.square().sum().backward()
        grads[chunk] = (rgb.detach(), {n: p.grad for n, p in field.named_parameters()})
    torch.testing.assert_close(grads[256][0], grads[None][0])
    for name, g in grads[None][1].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[256][1][name], g, msg=name)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_no_checkpoint_without_a_graph(mode: str, checkpoint_calls) -> None:
    field = _field("hashgrid", CHUNK, torch.float32)
    x, t, _, _ = _inputs(1000, torch.float32)
    with torch.no_grad():
        expected = _field("hashgrid", None, torch.float32)(x, t)
    if mode == "nothing_requires_grad":
        field.requires_grad_(False)
        context = torch.enable_grad()
    else:
        context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        density, rgb = field(x, t)
    assert checkpoint_calls == []  # the plain forward, in one piece
    assert torch.equal(density, expected[0]) and torch.equal(rgb, expected[1])
    assert density.grad_fn is None and rgb.grad_fn is None


def test_blob_std_of_the_forward_is_used_in_the_recomputation() -> None:
    """The clock may move (and the scheduled blob_std change) between forward and backward; the gradient must
    not see it. The ramp is 0.5 up to iteration 10, then 3.0."""
    n = 1000
    results = {}
    ramp = LinearRamp(start_value=0.5, end_value=3.0, start_iteration=10, n_steps=0)
    for label, chunk, it_forward, it_backward in [("plain_0.5", None, 10, 10), ("plain_3", None, 11, 11),
                                                  ("ckpt_changed", CHUNK, 10, 11)]:
        clock = Clock()
        field = _field("hashgrid", chunk, blob_std=Scheduled(StageSchedule((ramp, ramp, ramp)), clock))
        x, t, wd, wc = _inputs(n)
        x.requires_grad_(True)
        clock.iteration = it_forward
        loss = _loss(field, x, t, wd, wc)
        clock.iteration = it_backward
        assert field.blob_std == (0.5 if it_backward == 10 else 3.0)
        loss.backward()
        results[label] = x.grad
    assert not torch.allclose(results["plain_0.5"], results["plain_3"])  # blob_std matters to the gradient
    torch.testing.assert_close(results["ckpt_changed"], results["plain_0.5"], rtol=1e-12, atol=1e-12)


def test_checkpoint_chunk_is_validated_and_passed_through() -> None:
    for bad in (0, -4):
        with pytest.raises(ValueError, match="field.checkpoint_chunk"):
            FieldConfig(checkpoint_chunk=bad).validate()
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), {"field": {"checkpoint_chunk": bad}})
        with pytest.raises(ValueError, match="field.checkpoint_chunk"):
            OmegaConf.to_object(merged).validate()
        with pytest.raises(ValueError, match="field.checkpoint_chunk"):
            build_field(FieldConfig(checkpoint_chunk=bad))
    field = _field("hashgrid", 64)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="checkpoint_chunk must be a positive int"):
            Field4D(field.static_encoding, field.dynamic_encoding, checkpoint_chunk=bad)  # type: ignore[arg-type]
    assert field.checkpoint_chunk == 64
    assert build_field(FieldConfig(static_grid=SMALL_GRID, dynamic_grid=SMALL_GRID))[0].checkpoint_chunk is None


def test_profiled_memory_counts_exact_bytes() -> None:
    """The bench's instrument, on known allocations: 4 MiB held into "bwd", 12 MiB at the peak."""
    from torch.profiler import record_function

    def run() -> None:
        with record_function("fwd"):
            a = torch.empty(1 << 20)  # 4 MiB, kept into bwd
            b = torch.empty(1 << 21)  # 8 MiB, freed before bwd
            del b
        with record_function("bwd"):
            c = torch.empty(1 << 19)  # 2 MiB: peak stays 12 MiB
            del a, c

    kept: list[torch.Tensor] = []

    def earlier_session() -> None:
        with record_function("fwd"):
            kept.append(torch.empty(1 << 18))  # 1 MiB, freed below while no profiler runs
        with record_function("bwd"):
            pass

    assert profiled_memory(earlier_session) == {"held_after_forward": 1 << 20, "peak": 1 << 20}
    kept.clear()  # torch's running total misses this free; the next measurement must not
    assert profiled_memory(run) == {"held_after_forward": 4 << 20, "peak": 12 << 20}


def test_checkpointing_keeps_nothing_per_sample_between_forward_and_backward() -> None:
    from torch.profiler import record_function

    n = 8192
    x, t, wd, wc = _inputs(n, torch.float32)
    held = {}
    for chunk in (None, 1024):
        field = _field("hashgrid", chunk, torch.float32)

        def run(field: Field4D = field) -> None:
            with record_function("fwd"):
                loss = _loss(field, x, t, wd, wc)  # density and rgb are freed on return
            with record_function("bwd"):
                loss.backward()
        held[chunk] = profiled_memory(run)["held_after_forward"]
    # By hand, per sample: the summed features (C = 8 floats here, 32 in the paper's field) and the two
    # heads' hidden layers (2 x 64) are kept without checkpointing; with it only the chunks' inputs, which
    # are views of x and t (allocated before), so less than one float per sample (the scalar loss and
    # autograd's bookkeeping).
    assert field.static_encoding.n_output_dims == 8
    assert held[None] >= (8 + 2 * 64) * 4 * n
    assert held[1024] < 4 * n
