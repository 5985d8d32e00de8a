"""HashGridEncoding against tiny-cuda-nn reference outputs, a naive reference and autograd's gradcheck.

The reference cases in shared/testdata/hashgrid are float32 tcnn-semantics outputs: `*.json` holds the
constructor arguments and the expected layout, `*.npz` holds x [N, D] (float32), params [n_params]
(float32, tcnn layout) and expected [N, L*F] (float32).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fourdfy.fields.hashgrid import HashGridEncoding

pytestmark = pytest.mark.numerics  # floats against references: .ci/run reruns these on other SIMD kernels

DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "hashgrid"
CASES = sorted(p.stem for p in DATA.glob("*.json")) if DATA.is_dir() else []
CTOR_KEYS = (
    "n_input_dims",
    "n_levels",
    "n_features_per_level",
    "log2_hashmap_size",
    "base_resolution",
    "per_level_scale",
)
PRIMES = (1, 2654435761, 805459861, 3674653429)  # tiny-cuda-nn grid.h fast_hash

# Tiny grids with dense and hashed levels (resolutions 2, 4, 8; the last level overflows the table).
TINY_3D: dict[str, Any] = dict(
    n_input_dims=3, n_levels=3, n_features_per_level=2, log2_hashmap_size=6, base_resolution=2,
    per_level_scale=2.0,
)
TINY_4D: dict[str, Any] = {**TINY_3D, "n_input_dims": 4, "log2_hashmap_size": 8}
# Even smaller ones for gradcheck (its cost grows with the parameter count): 3D tables 8 (dense), 16, 16
# (hashed); 4D tables 16 (dense), 32 (hashed).
GRAD_3D: dict[str, Any] = {**TINY_3D, "log2_hashmap_size": 4}
GRAD_4D: dict[str, Any] = {**TINY_3D, "n_input_dims": 4, "n_levels": 2, "log2_hashmap_size": 5}


def naive_encode(x: np.ndarray, params: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """tcnn's kernel transcribed in float64 with Python ints: loops over levels, points and corners.

    x: [N, D] float64, params: [n_params] float64 -> [N, L*F].
    """
    d_in, n_levels, n_feat = cfg["n_input_dims"], cfg["n_levels"], cfg["n_features_per_level"]
    max_table = 2 ** cfg["log2_hashmap_size"]
    f32 = np.float32
    # tcnn's log2f/exp2f are correctly rounded float32 functions. NumPy's float32 log2/exp2 are not (their
    # SIMD paths differ between CPUs by an ulp), so each is evaluated in double with Python's math (error far
    # below a float32 ulp) and rounded once to float32. Products and differences of float32 numbers are
    # rounded by NumPy's float32 arithmetic, which is IEEE-exact on every CPU.
    log2_pls = f32(math.log2(float(f32(cfg["per_level_scale"]))))
    out = np.zeros((x.shape[0], n_levels * n_feat))
    offset = 0
    for level in range(n_levels):
        exp2 = f32(2.0 ** float(f32(level) * log2_pls))
        scale = float(f32(exp2 * f32(cfg["base_resolution"])) - f32(1.0))
        res = math.ceil(scale) + 1
        table = min((res**d_in + 7) // 8 * 8, max_table)
        dense = res**d_in <= table
        for n in range(x.shape[0]):
            pos = [scale * float(x[n, d]) + 0.5 for d in range(d_in)]
            cell = [math.floor(p) for p in pos]
            frac = [p - c for p, c in zip(pos, cell, strict=True)]
            for bits in itertools.product((0, 1), repeat=d_in):
                corner = [c + b for c, b in zip(cell, bits, strict=True)]
                weight = math.prod(fr if b else 1.0 - fr for fr, b in zip(frac, bits, strict=True))
                if dense:
                    idx = sum(c * res**d for d, c in enumerate(corner)) % table
                else:
                    h = 0
                    for d, c in enumerate(corner):
                        h ^= (c * PRIMES[d]) & 0xFFFFFFFF
                    idx = h % table
                for f in range(n_feat):
                    out[n, level * n_feat + f] += weight * params[(offset + idx) * n_feat + f]
        offset += table
    return out


def load_case(name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta = json.loads((DATA / f"{name}.json").read_text())
    with np.load(DATA / f"{name}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return meta, arrays


@pytest.mark.skipif(not CASES, reason=f"hash grid test data not found at {DATA}")
@pytest.mark.parametrize("name", CASES)
def test_matches_tcnn_reference(name: str) -> None:
    meta, arrays = load_case(name)
    x, params, expected = arrays["x"], arrays["params"], arrays["expected"]
    assert x.dtype == params.dtype == expected.dtype == np.float32
    enc = HashGridEncoding(**{k: meta[k] for k in CTOR_KEYS})
    assert enc.n_params == meta["n_params"] == params.shape[0]
    assert enc.level_offsets == meta["level_offsets"]
    assert enc.level_resolutions == meta["level_resolutions"]
    assert enc.n_output_dims == meta["n_levels"] * meta["n_features_per_level"] == expected.shape[1]
    # A tcnn state dict is {"params": flat tensor}; it must load unchanged.
    enc.load_state_dict({"params": torch.from_numpy(params)})
    with torch.no_grad():
        y = enc(torch.from_numpy(x))
    assert y.dtype == torch.float32 and y.shape == expected.shape
    assert np.abs(y.numpy() - expected).max() <= 1e-5
    # Small chunks must not change anything (chunking is an implementation detail).
    enc_chunked = HashGridEncoding(**{k: meta[k] for k in CTOR_KEYS}, chunk_size=37)
    enc_chunked.load_state_dict(enc.state_dict())
    with torch.no_grad():
        assert torch.equal(enc_chunked(torch.from_numpy(x)), y)


@pytest.mark.parametrize(
    "cfg",
    [
        TINY_3D,
        TINY_4D,
        {**TINY_3D, "n_features_per_level": 1},
        {**TINY_3D, "n_features_per_level": 4, "base_resolution": 3, "per_level_scale": 1.7},
        {**TINY_4D, "n_levels": 4, "per_level_scale": 1.5, "base_resolution": 3},
    ],
)
def test_matches_naive_reference(cfg: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(12, cfg["n_input_dims"], generator=gen, dtype=torch.float64)
    x[0] = 0.0  # lower box corner
    x[1] = 1.0  # upper box corner: the upper corner index reaches `res` and wraps in dense levels
    x[2, 0] = 0.5  # often lands exactly on a grid vertex
    enc = HashGridEncoding(**cfg).double()
    with torch.no_grad():
        enc.params.uniform_(-1.0, 1.0, generator=gen)
        expected = naive_encode(x.numpy(), enc.params.numpy(), cfg)
        assert np.abs(enc(x).numpy() - expected).max() < 1e-12
        enc32 = HashGridEncoding(**cfg)
        enc32.load_state_dict({"params": enc.params.float()})
        assert np.abs(enc32(x.float()).double().numpy() - expected).max() < 1e-5


@pytest.mark.parametrize("cfg", [GRAD_3D, GRAD_4D, {**GRAD_3D, "n_features_per_level": 4}])
def test_gradcheck(cfg: dict[str, Any]) -> None:
    enc = HashGridEncoding(**cfg).double()
    layout = enc.layout
    assert any(layout.hashed) and not all(layout.hashed)  # both kinds of level are exercised
    gen = torch.Generator().manual_seed(1)
    # Away from the box faces so the finite differences stay inside [0, 1] and inside one cell.
    x = (0.05 + 0.9 * torch.rand(4, cfg["n_input_dims"], generator=gen, dtype=torch.float64)).requires_grad_()
    params = (torch.rand(enc.n_params, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_()

    def f(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(enc, {"params": params}, (x,))

    assert torch.autograd.gradcheck(f, (x.detach(), params))  # w.r.t. params
    assert torch.autograd.gradcheck(f, (x, params))  # w.r.t. params and x
    assert torch.autograd.gradgradcheck(f, (x, params), fast_mode=True)  # second order (analytic normals)


def test_param_gradient_in_chunks_matches_one_chunk() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(100, 4, generator=gen)
    w = torch.randn(100, 6, generator=gen)
    grads = []
    for chunk in (7, 1000):
        enc = HashGridEncoding(**TINY_4D, chunk_size=chunk)
        with torch.no_grad():
            enc.params.copy_(torch.linspace(-1, 1, enc.n_params))
        xg = x.clone().requires_grad_()
        (enc(xg) * w).sum().backward()
        grads.append((enc.params.grad, xg.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_state_dict_and_init_match_tcnn() -> None:
    enc = HashGridEncoding(**TINY_3D)
    state = enc.state_dict()
    assert list(state) == ["params"] and state["params"].shape == (enc.n_params,)
    assert enc.params.dtype == torch.float32
    assert enc.params.abs().max() <= 1e-4 and enc.params.std() > 1e-5  # tcnn: uniform in [-1e-4, 1e-4]
    # Hand-computed layout: resolutions 2, 4, 8; tables 8 (2^3), 64 (4^3 = 64 fits), 64 (hashed, 2^6).
    assert enc.level_resolutions == [2, 4, 8]
    assert enc.level_offsets == [0, 8, 72, 136]
    assert enc.n_params == 136 * 2 and enc.n_output_dims == 6


def test_paper_grid_layout() -> None:
    # Authors' geometry.pos_encoding_config: 16 levels, F=2, log2 T=19, base 16, per-level scale 1.447269237440378
    # (finest 4096).
    enc = HashGridEncoding(3, 16, 2, 19, 16, 1.447269237440378)
    assert enc.level_resolutions[0] == 16 and enc.level_resolutions[-1] == 4096
    assert enc.level_offsets[-1] - enc.level_offsets[-2] == 2**19
    assert enc.n_output_dims == 32


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.full((3, 3), 0.5).add_(torch.tensor([0.0, 0.0, 0.6])), r"\[0, 1\]"),
        (torch.full((3, 3), 0.5).sub_(torch.tensor([0.0, 0.7, 0.0])), r"\[0, 1\]"),
        (torch.tensor([[0.5, float("nan"), 0.5]]), r"\[0, 1\]"),
        (torch.full((3, 4), 0.5), r"shape \[N, 3\]"),
        (torch.full((3,), 0.5), r"shape \[N, 3\]"),
        (torch.zeros(3, 3, dtype=torch.int64), "floating-point"),
    ],
)
def test_bad_input_raises(x: torch.Tensor, match: str) -> None:
    enc = HashGridEncoding(**TINY_3D)
    with pytest.raises(ValueError, match=match) as info:
        enc(x)
    assert "x " in str(info.value)  # the message names the argument


def test_check_inputs_flag_skips_validation_only() -> None:
    x = torch.rand(20, 3, generator=torch.Generator().manual_seed(3))
    checked, unchecked = HashGridEncoding(**TINY_3D), HashGridEncoding(**TINY_3D, check_inputs=False)
    unchecked.load_state_dict(checked.state_dict())
    assert torch.equal(checked(x), unchecked(x))
    with pytest.raises(ValueError, match="floating-point"):
        checked(torch.zeros(2, 3, dtype=torch.int32))


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError, match="n_input_dims"):
        HashGridEncoding(**{**TINY_3D, "n_input_dims": 5})
    with pytest.raises(ValueError, match="per_level_scale"):
        HashGridEncoding(**{**TINY_3D, "per_level_scale": 0.5})
    with pytest.raises(ValueError, match="backend"):
        HashGridEncoding(**TINY_3D, backend="cuda")  # type: ignore[arg-type]


def test_tcnn_backend_without_tinycudann_is_a_clear_error() -> None:
    try:
        import tinycudann  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("tinycudann is installed; the error path cannot be exercised here")
    with pytest.raises(ValueError, match="tinycudann"):
        HashGridEncoding(**TINY_3D, backend="tcnn")


def test_tcnn_backend_wiring(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a stand-in `tinycudann` (the real one needs CUDA): config, parameter count, state dict."""
    created: list[dict[str, Any]] = []

    class FakeEncoding(torch.nn.Module):
        def __init__(self, n_input_dims: int, encoding_config: dict[str, Any], dtype: torch.dtype) -> None:
            super().__init__()
            created.append({"n_input_dims": n_input_dims, **encoding_config, "dtype": dtype})
            n_params = HashGridEncoding(n_input_dims, **{k: encoding_config[k] for k in CTOR_KEYS[1:]}).n_params
            self.params = torch.nn.Parameter(torch.zeros(n_params))

    fake = types.ModuleType("tinycudann")
    fake.Encoding = FakeEncoding  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tinycudann", fake)
    enc = HashGridEncoding(**TINY_4D, backend="tcnn")
    assert created == [{**TINY_4D, "otype": "HashGrid", "dtype": torch.float32}]
    assert list(enc.state_dict()) == ["params"]
    with pytest.raises(ValueError, match="CUDA"):
        enc(torch.rand(5, 4))


def test_empty_batch() -> None:
    enc = HashGridEncoding(**TINY_4D)
    y = enc(torch.zeros(0, 4))
    assert y.shape == (0, 6)
    y.sum().backward()
    assert enc.params.grad is not None and not enc.params.grad.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(4)
    enc = HashGridEncoding(4, 6, 2, 14, 4, 1.6)
    x = torch.rand(1000, 4, generator=gen)
    y_cpu = enc(x)
    y_cpu.square().sum().backward()
    g_cpu = enc.params.grad.clone()
    enc.params.grad = None
    enc = enc.cuda()
    y_gpu = enc(x.cuda())
    y_gpu.square().sum().backward()
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.params.grad.cpu(), g_cpu, atol=1e-5, rtol=1e-5)
