"""CPU memory and time of one forward + backward of the paper-size field, activation checkpointing off vs on.

    python -m bench.field_memory [--n-samples 131072] [--chunk 32768] [--repeats 2] [--out FILE]

The field is the paper's hash-grid Field4D (`FieldConfig()` defaults: two 16-level × 2-feature grids with
2^19-entry tables, 64-wide heads) on N samples uniform in the scene box at the 16 frame times, with a
random weighted sum of (density, rgb) as the loss, as the renderer would feed it. Three cases:

- ``off``: ``checkpoint_chunk = None`` (every activation kept for backward);
- ``heads``: only the two MLP heads checkpointed (features computed outside, in chunks of ``--chunk``):
  the alternative that `Field4D.forward` rejects, measured so that choice rests on numbers;
- ``full``: ``checkpoint_chunk = --chunk`` (the whole field forward recomputed per chunk in backward).

Memory: each case runs in a fresh subprocess, one pass under ``torch.profiler`` with
``profile_memory=True``. The profiler receives every allocation and free of torch's CPU allocator with the
running total of bytes allocated since profiling began, so the numbers are exact tensor bytes, independent
of glibc's caching and of whatever else runs on the machine (peak RSS is not: glibc keeps freed blocks
below its dynamic mmap threshold, up to 32 MiB each, resident). x and t are copied inside the measured
forward, as the renderer creates them, so what the field keeps of them (the chunks' inputs) is counted.

Time: one more subprocess times the three cases interleaved (off, heads, full, off, ...), best of
``--repeats`` each, so a load change on a shared machine hits all cases alike.

Printed JSON, per case: ``held_after_forward_mib`` (bytes alive between forward and backward, including
the outputs density and rgb, 16 B per sample: what a larger render multiplies), ``held_bytes_per_sample``,
``held_gib_at_vid_step`` (that per-sample figure times the 35.4 M samples of a paper VID step),
``peak_mib`` (peak during forward + backward, including the parameter gradients ``param_grad_mib``; a
chunked case also holds one chunk's dense table gradient until it is accumulated, ~one grid's size) and
``seconds``; and ratios to ``off``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

CASES = ("off", "heads", "full")
WARMUP_SAMPLES = 4096  # warm-up pass size: builds the hash grid's cached index constants, faults in code
N_FRAMES = 16  # the video prior's 16 frame times (t = i / 15), as in a video step
MIB = 2**20
# Samples of one paper VID step: 16 frames of 160×288 rays (bench/gpu.py, Zeroscope render size) × 48
# samples per ray (RendererConfig.n_samples).
VID_STEP_SAMPLES = 16 * 160 * 288 * 48


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [n,3] uniform in [-1,1]^3, t: [n] on the frame times, loss weights [n] and [n,3]."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, generator=gen) * 2.0 - 1.0
    t = torch.randint(0, N_FRAMES, (n,), generator=gen).float() / (N_FRAMES - 1)
    return x, t, torch.randn(n, generator=gen), torch.randn(n, 3, generator=gen)


def _heads_checkpointed(field: Any, chunk: int) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """The rejected alternative: encodings in one piece, each chunk of the heads under checkpoint."""
    from torch.utils.checkpoint import checkpoint

    def run(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, inside = field.features(x, t)
        pieces = [
            checkpoint(field.heads, features[s : s + chunk], x[s : s + chunk], inside[s : s + chunk],
                       field.blob_std, use_reentrant=False, preserve_rng_state=False)
            for s in range(0, x.shape[0], chunk)
        ]
        return torch.cat([d for d, _ in pieces]), torch.cat([c for _, c in pieces])
    return run


def _pass(fn: Callable[[torch.Tensor, torch.Tensor], Any], x: torch.Tensor, t: torch.Tensor,
          w_density: torch.Tensor, w_rgb: torch.Tensor, annotate: bool = False) -> None:
    """One forward + backward on fresh copies of x, t; with annotate, the halves are marked "fwd"/"bwd"."""
    from torch.profiler import record_function

    with record_function("fwd") if annotate else contextlib.nullcontext():
        x_copy, t_copy = x.clone(), t.clone()  # freed below unless the graph keeps them
        density, rgb = fn(x_copy, t_copy)
        del x_copy, t_copy
        loss = (density * w_density).sum() + (rgb * w_rgb).sum()
    with record_function("bwd") if annotate else contextlib.nullcontext():
        loss.backward()


def profiled_memory(run: Callable[[], None]) -> dict[str, int]:
    """Bytes of torch's CPU allocator during run(), which must mark its halves "fwd" and "bwd".

    Returns held_after_forward (allocated, not yet freed, when "bwd" begins) and peak (the maximum at any
    point), both counting only blocks allocated inside run(). Exact when run() frees no block allocated
    under an earlier profiler session (a fresh process, as `main` uses, guarantees it).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    bwd_start = min(e["ts"] for e in events if e.get("name") == "bwd" and e.get("ph") == "X")
    memory = sorted(  # in recording order ("Ev Idx" breaks timestamp ties)
        (e["ts"], e["args"]["Ev Idx"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0  # 0: CPU
    )
    if not memory:
        raise RuntimeError("the profiler recorded no CPU memory events; cannot measure")
    # torch's running total is process-wide and misses frees made while no profiler runs, so an earlier
    # session can leave it above 0: count from the total just before the first event.
    base = memory[0][2] - memory[0][3]
    before_bwd = [total for ts, _, total, _ in memory if ts < bwd_start]
    held = before_bwd[-1] - base if before_bwd else 0
    return {"held_after_forward": held, "peak": max(total for _, _, total, _ in memory) - base}


def _build(case: str, chunk: int) -> tuple[Any, Callable[[torch.Tensor, torch.Tensor], Any]]:
    """The paper-size field (seed 0) and the callable that evaluates it under `case`."""
    from fourdfy.build import build_field
    from fourdfy.fields.field4d import FieldConfig

    torch.manual_seed(0)
    field, _ = build_field(FieldConfig(checkpoint_chunk=chunk if case == "full" else None))
    return field, _heads_checkpointed(field, chunk) if case == "heads" else field


def measure_memory(case: str, n_samples: int, chunk: int) -> dict[str, Any]:
    """Memory of one case in this process (a fresh subprocess started by `main`)."""
    field, fn = _build(case, chunk)
    _pass(fn, *_inputs(WARMUP_SAMPLES))  # builds the grids' cached constants outside the measurement
    field.zero_grad(set_to_none=True)
    x, t, w_density, w_rgb = _inputs(n_samples)
    mem = profiled_memory(lambda: _pass(fn, x, t, w_density, w_rgb, annotate=True))
    per_sample = mem["held_after_forward"] / n_samples
    return {
        "held_after_forward_mib": round(mem["held_after_forward"] / MIB, 1),
        "held_bytes_per_sample": round(per_sample, 1),
        "held_gib_at_vid_step": round(per_sample * VID_STEP_SAMPLES / 2**30, 2),
        "peak_mib": round(mem["peak"] / MIB, 1),
        "param_grad_mib": round(sum(p.numel() * p.element_size() for p in field.parameters()) / MIB, 1),
    }


def measure_time(cases: tuple[str, ...], n_samples: int, chunk: int, repeats: int) -> dict[str, float]:
    """Best seconds of a forward + backward per case, the cases interleaved `repeats` times."""
    field, _ = _build("off", chunk)
    fns: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
        "off": field, "heads": _heads_checkpointed(field, chunk), "full": field}
    inputs = _inputs(n_samples)
    _pass(field, *_inputs(WARMUP_SAMPLES))
    best = {case: math.inf for case in cases}
    for _ in range(repeats):
        for case in cases:
            field.checkpoint_chunk = chunk if case == "full" else None
            field.zero_grad(set_to_none=True)
            start = time.perf_counter()
            _pass(fns[case], *inputs)
            best[case] = min(best[case], time.perf_counter() - start)
    return best


def _subprocess(args: list[str]) -> Any:
    """Run this module with `args` in a fresh interpreter; its last stdout line, parsed as JSON."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "bench.field_memory", *args], capture_output=True, text=True,
                          cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.field_memory {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.field_memory", description=__doc__.split("\n")[0])
    # 2^17 samples and 2 timed passes keep the three cases near a minute on a shared 2-core machine.
    parser.add_argument("--n-samples", type=int, default=1 << 17, help="samples per forward + backward")
    parser.add_argument("--chunk", type=int, default=1 << 15, help="samples per checkpointed chunk")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per case (best reported)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    parser.add_argument("--memory-case", choices=CASES, default=None, help=argparse.SUPPRESS)  # subprocess
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)  # subprocess
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if args.n_samples < 1 or args.chunk < 1 or args.repeats < 1:
        parser.error(f"--n-samples, --chunk and --repeats must be >= 1, got {args.n_samples}, {args.chunk}, "
                     f"{args.repeats}")
    cases = tuple(c for c in args.cases.split(",") if c)
    if not cases or any(c not in CASES for c in cases):
        parser.error(f"--cases must be a comma-separated subset of {','.join(CASES)}, got {args.cases!r}")
    sizes = ["--n-samples", str(args.n_samples), "--chunk", str(args.chunk)]
    if args.memory_case is not None:
        print(json.dumps(measure_memory(args.memory_case, args.n_samples, args.chunk)))
        return 0
    if args.timing:
        print(json.dumps(measure_time(cases, args.n_samples, args.chunk, args.repeats)))
        return 0
    result: dict[str, Any] = {"n_samples": args.n_samples, "chunk": args.chunk, "repeats": args.repeats,
                              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cases": {}}
    try:
        for case in cases:
            result["cases"][case] = {"checkpoint": case, **_subprocess(["--memory-case", case, *sizes])}
            print(f"[bench.field_memory] memory {case}: {result['cases'][case]}", file=sys.stderr, flush=True)
        seconds = _subprocess(["--timing", "--cases", ",".join(cases), "--repeats", str(args.repeats), *sizes])
    except RuntimeError as err:
        print(str(err), file=sys.stderr)
        return 1
    for case in cases:
        result["cases"][case]["seconds"] = round(seconds[case], 3)
    if "off" in result["cases"]:
        off = result["cases"]["off"]
        result["ratios_to_off"] = {
            case: {"held_after_forward": round(r["held_after_forward_mib"] / off["held_after_forward_mib"], 4),
                   "peak": round(r["peak_mib"] / off["peak_mib"], 4),
                   "seconds": round(r["seconds"] / off["seconds"], 3)}
            for case, r in result["cases"].items() if case != "off"
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
