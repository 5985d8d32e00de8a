"""The Triton backend of HashGridEncoding against the torch backend (the reference, tests/test_hashgrid.py).

Without a GPU the kernels run on CPU tensors in Triton's interpreter: the `device` fixture sets
TRITON_INTERPRET=1 for each test through monkeypatch (hashgrid_triton jits its kernels at the first launch
in a mode, so nothing needs it before `import triton`, and no other test module sees the variable). With a
GPU the same tests run the compiled kernels on CUDA tensors.

Tolerances: outputs are sums of 2^D corner terms of |w * v| <= |v| <= 1 in float32, evaluated in another
order than the torch backend's lerp tree, so they differ by a few float32 ulps of 1 (~1e-7): 1e-6 abs.
Gradients are sums of many such terms accumulated in another order (atomics): 1e-5 relative to the
gradient's largest entry.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import numpy as np
import pytest
import torch

# The public test vectors and tiny configs of the torch backend's tests (tests/ is on sys.path under pytest).
from test_hashgrid import CASES, CTOR_KEYS, TINY_3D, TINY_4D, load_case

from fourdfy.fields.hashgrid import HashGridEncoding

pytestmark = pytest.mark.numerics
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the triton package is not installed (it comes with "
    "Linux torch wheels)"
)

OUT_ATOL = 1e-6
GRAD_RTOL = 1e-5
CONFIGS: list[dict[str, Any]] = [
    TINY_3D,  # resolutions 2, 4, 8: dense, dense, hashed
    TINY_4D,  # dense, dense, hashed
    {**TINY_3D, "n_features_per_level": 1},
    # res 3: 27 entries padded to 32, the upper corner's index 27..31 lands in the padding; F = 4.
    {**TINY_3D, "n_features_per_level": 4, "base_resolution": 3, "per_level_scale": 1.7},
    {**TINY_4D, "n_levels": 4, "per_level_scale": 1.5, "base_resolution": 3},  # 4D, boundary mid-way
    # resolutions 5, 7, 9, 11, 15 with 2^9 entries: two dense levels, three hashed; F = 3 (padded to 4).
    {**TINY_3D, "n_levels": 5, "per_level_scale": 1.3, "base_resolution": 5, "n_features_per_level": 3,
     "log2_hashmap_size": 9},
]


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def pair(cfg: dict[str, Any], device: torch.device, gen: torch.Generator) -> tuple[HashGridEncoding, ...]:
    """A torch-backend and a triton-backend encoding sharing random parameters in [-1, 1]."""
    ref = HashGridEncoding(**cfg)
    with torch.no_grad():
        ref.params.uniform_(-1.0, 1.0, generator=gen)
    tri = HashGridEncoding(**cfg, backend="triton")
    tri.load_state_dict(ref.state_dict())
    return ref.to(device), tri.to(device)


def compare(ref: HashGridEncoding, tri: HashGridEncoding, x: torch.Tensor, gen: torch.Generator) -> None:
    """Forward, table gradient and x gradient of the two backends on x [N, D]."""
    w = torch.randn(x.shape[0], ref.n_output_dims, generator=gen).to(x.device)
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yt = ref(xr), tri(xt)
    assert yt.dtype == yr.dtype == torch.float32 and yt.shape == yr.shape
    assert (yt - yr).abs().max().item() <= OUT_ATOL
    (yr * w).sum().backward()
    (yt * w).sum().backward()
    for got, want in ((tri.params.grad, ref.params.grad), (xt.grad, xr.grad)):
        torch.testing.assert_close(got, want, rtol=GRAD_RTOL, atol=GRAD_RTOL * want.abs().max().item())


@needs_triton
@pytest.mark.skipif(not CASES, reason="hash grid test data not found (see tests/test_hashgrid.py)")
@pytest.mark.parametrize("name", CASES)
def test_matches_torch_on_public_vectors(name: str, device: torch.device) -> None:
    meta, arrays = load_case(name)
    cfg = {k: meta[k] for k in CTOR_KEYS}
    params = torch.from_numpy(arrays["params"])
    ref, tri = HashGridEncoding(**cfg), HashGridEncoding(**cfg, backend="triton")
    ref.load_state_dict({"params": params})
    tri.load_state_dict({"params": params})  # the tcnn/torch state dict loads unchanged
    ref, tri = ref.to(device), tri.to(device)
    x = torch.from_numpy(arrays["x"]).to(device)
    with torch.no_grad():
        y = tri(x)
    assert np.abs(y.cpu().numpy() - arrays["expected"]).max() <= 1e-5  # tcnn's numbers, as the torch test
    compare(ref, tri, x, torch.Generator().manual_seed(0))


@needs_triton
@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_torch_on_random_points_and_box_corners(cfg: dict[str, Any], device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    ref, tri = pair(cfg, device, gen)
    layout = ref.layout
    assert any(layout.hashed) and not all(layout.hashed)  # the dense/hashed boundary is crossed
    d = cfg["n_input_dims"]
    corners = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * d)  # every box corner, 0 and 1 exactly
    x = torch.cat([corners, torch.rand(60, d, generator=gen), torch.full((1, d), 0.5)]).to(device)
    compare(ref, tri, x, gen)


@needs_triton
@pytest.mark.parametrize("n_dims", [3, 4])
def test_matches_torch_at_paper_size(n_dims: int, device: torch.device) -> None:
    """The paper's grids (16 levels, 2^19 entries, 16 -> 4096; dense/hashed boundary after level 5 in 3D,
    2 in 4D) on a few points: the fine levels' large scales test pos = fl32(scale * x + 0.5)."""
    gen = torch.Generator().manual_seed(3)
    ref, tri = pair(dict(n_input_dims=n_dims, n_levels=16, n_features_per_level=2, log2_hashmap_size=19,
                         base_resolution=16, per_level_scale=1.447269237440378), device, gen)
    x = torch.rand(30, n_dims, generator=gen)
    x[0], x[1] = 0.0, 1.0
    compare(ref, tri, x.to(device), gen)


@needs_triton
def test_state_dict_and_parameters_match_torch_backend(device: torch.device) -> None:
    ref, tri = HashGridEncoding(**TINY_4D), HashGridEncoding(**TINY_4D, backend="triton")
    assert list(tri.state_dict()) == list(ref.state_dict()) == ["params"]
    assert tri.params.shape == ref.params.shape and tri.level_offsets == ref.level_offsets


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_tables_accumulate_in_float32(dtype: torch.dtype, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(2)
    ref, tri = pair(TINY_3D, device, gen)
    with torch.no_grad():
        ref.params.copy_(ref.params.to(dtype))  # the same (rounded) table values in both
    tri = tri.to(dtype)
    tri.load_state_dict({"params": ref.params.detach().to(dtype)})
    x = torch.rand(40, 3, generator=gen).to(device)
    # grad_out reaches the function in the table dtype: make it exact there so only the end result rounds.
    w = torch.randn(40, ref.n_output_dims, generator=gen).to(dtype).float().to(device)
    yr, yt = ref(x), tri(x)
    assert yt.dtype == dtype
    # float32 result rounded once to the half type: within half an ulp (2^-11 / 2^-8 relative) of it.
    eps = torch.finfo(dtype).eps
    assert ((yt.float() - yr).abs() <= eps * yr.abs() + OUT_ATOL).all()
    (yr * w).sum().backward()
    (yt.float() * w).sum().backward()
    assert tri.params.grad.dtype == dtype
    want = ref.params.grad
    assert ((tri.params.grad.float() - want).abs() <= eps * want.abs() + GRAD_RTOL * want.abs().max()).all()


@needs_triton
def test_empty_batch_and_first_order_only(device: torch.device) -> None:
    tri = HashGridEncoding(**TINY_4D, backend="triton").to(device)
    y = tri(torch.zeros(0, 4, device=device))
    assert y.shape == (0, 6)
    y.sum().backward()
    assert tri.params.grad is not None and not tri.params.grad.any()
    x = torch.rand(5, 4, device=device, requires_grad=True)
    (gx,) = torch.autograd.grad(tri(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()  # a second derivative is the torch backend's job (analytic normals)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the error path needs a machine without CUDA")
def test_cpu_tensors_without_interpreter_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tri = HashGridEncoding(**TINY_3D, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CUDA"):
        tri(torch.rand(4, 3))


@pytest.mark.parametrize("missing", [pytest.param("cuda", marks=needs_triton), "triton"])
def test_unavailable_backend_names_the_config_keys(missing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if missing == "triton":  # an import of either module now raises ImportError
        monkeypatch.setitem(sys.modules, "triton", None)
        monkeypatch.setitem(sys.modules, "fourdfy.fields.hashgrid_triton", None)
    with pytest.raises(ValueError) as info:
        HashGridEncoding(**TINY_3D, backend="triton")
    message = str(info.value)
    assert "\n" not in message and missing.upper() in message.upper()
    assert "field.static_grid.backend" in message and "field.dynamic_grid.backend" in message
    assert message.endswith("to torch (same parameters, same numbers)")
