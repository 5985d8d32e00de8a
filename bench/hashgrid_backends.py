"""Hash grid backends on the GPU: torch vs triton (and tcnn when installed), forward + backward, paper size.

    python -m bench.hashgrid_backends [--points-3d N] [--points-4d N] [--chunk N] [--reps R] [--out FILE]

Per grid (the paper's 3D static grid and 4D dynamic grid: 16 levels x 2 features, 2^19 entries, 16 -> 4096,
HashGridConfig's defaults) it pushes one iteration's samples through each backend in chunks: forward, then
backward of a fixed random grad_out into the table (x needs no gradient, as in training). Printed JSON, per
grid ("3d", "4d"):
- ``n_points``, ``chunk``; per backend ``seconds`` (median over --reps of the whole pass, CUDA-synchronised),
  ``points_per_s``, ``peak_memory_gib`` (torch.cuda.max_memory_allocated during the pass);
- ``ratio_vs_torch``: torch seconds / backend seconds (> 1: faster than the reference);
- ``max_abs_diff`` of the outputs and ``grad_rel_diff`` (max |diff| / max |torch grad|) of the table
  gradient against the torch backend on the first chunk;
- a backend that cannot run here is listed as ``{"unavailable": reason}``.
Without CUDA it prints ``{"skipped": "..."}`` and exits 0 (nothing to measure; the kernels' CPU tests run
in tests/test_hashgrid_triton.py under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from fourdfy.fields.hashgrid import Backend, HashGridConfig, HashGridEncoding

# Samples of one iteration at paper size (bench/README.md): 3D (MVDream) 4 views x 256^2 x 48 samples per
# ray = 12.6 M; VID (Zeroscope) 16 frames x 160 x 288 x 48 = 35 M.
POINTS_3D = 4 * 256 * 256 * 48
POINTS_4D = 16 * 160 * 288 * 48
# Points per chunk: conf/preset/paper.yaml's field.*_grid.chunk_size (bounds the torch backend's temporaries
# to ~0.5 GB); the same chunks for every backend, so the comparison is per call.
CHUNK = 1 << 18
BACKENDS = (Backend.torch, Backend.triton, Backend.tcnn)


def build(backend: Backend, n_dims: int, chunk: int) -> HashGridEncoding:
    cfg = HashGridConfig()
    return HashGridEncoding(
        n_dims, cfg.n_levels, cfg.n_features_per_level, cfg.log2_hashmap_size, cfg.base_resolution,
        cfg.per_level_scale, backend=backend, check_inputs=False, chunk_size=chunk,
    ).cuda()


def timed_pass(enc: HashGridEncoding, x: torch.Tensor, grad: torch.Tensor, chunk: int) -> float:
    """Seconds of forward + backward over all of x [N, D] in chunks (grad [chunk, L*F] reused)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for lo in range(0, x.shape[0], chunk):
        xc = x[lo : lo + chunk]
        enc(xc).backward(grad[: xc.shape[0]])
    torch.cuda.synchronize()
    return time.perf_counter() - start


def first_chunk(enc: HashGridEncoding, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [chunk, L*F], table gradient [n_params]) of one chunk."""
    enc.params.grad = None
    y = enc(x)
    y.backward(grad)
    return y.detach().float(), enc.params.grad.detach().float().clone()


def bench_grid(n_dims: int, n_points: int, chunk: int, reps: int, log: Callable[[str], None]) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(n_points, n_dims, generator=gen, device="cuda")
    ref = build(Backend.torch, n_dims, chunk)
    with torch.no_grad():
        ref.params.uniform_(-1.0, 1.0, generator=gen)
    grad = torch.randn(chunk, ref.n_output_dims, generator=gen, device="cuda")
    result: dict[str, Any] = {"n_points": n_points, "chunk": chunk}
    y_ref, g_ref = first_chunk(ref, x[:chunk], grad[: min(chunk, n_points)])
    for backend in BACKENDS:
        try:
            enc = ref if backend == Backend.torch else build(backend, n_dims, chunk)
        except ValueError as err:
            result[str(backend)] = {"unavailable": str(err)}
            continue
        enc.load_state_dict(ref.state_dict())
        y, g = first_chunk(enc, x[:chunk], grad[: min(chunk, n_points)])  # also the warm-up (compilation)
        torch.cuda.reset_peak_memory_stats()
        seconds = statistics.median(timed_pass(enc, x, grad, chunk) for _ in range(reps))
        entry = {
            "seconds": round(seconds, 4),
            "points_per_s": round(n_points / seconds),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "max_abs_diff": float((y - y_ref).abs().max()),
            "grad_rel_diff": float((g - g_ref).abs().max() / g_ref.abs().max()),
        }
        result[str(backend)] = entry
        log(f"[bench.hashgrid_backends] {n_dims}d {backend}: {json.dumps(entry)}")
        del enc
    torch_s = result["torch"]["seconds"]
    for backend in BACKENDS:
        if "seconds" in result[str(backend)]:
            result[str(backend)]["ratio_vs_torch"] = round(torch_s / result[str(backend)]["seconds"], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hashgrid_backends", description=__doc__.split("\n")[0])
    parser.add_argument("--points-3d", type=int, default=POINTS_3D, help="points through the 3D grid")
    parser.add_argument("--points-4d", type=int, default=POINTS_4D, help="points through the 4D grid")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="points per call")
    parser.add_argument("--reps", type=int, default=3, help="timed passes per backend (median)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        result: dict[str, Any] = {"skipped": "no CUDA device: the backends are compared on a GPU only"}
    else:
        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        result = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "3d": bench_grid(3, args.points_3d, args.chunk, args.reps, log),
            "4d": bench_grid(4, args.points_4d, args.chunk, args.reps, log),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
