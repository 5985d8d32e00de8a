"""How much fp16 MVDream changes the SDS gradient at CFG 50 (issue #15 row 7): prints JSON.

The authors train in fp32 (trainer.precision: 32 in every stage file) and build MVDream in fp32; fp16 halves
the UNet's memory. The gradient the field receives is w·(ε_u + s(ε_c − ε_u) − ε) (or, with the authors'
x̂0-reconstruction loss, z − x̂0(ε_cfg)), and the rounding of ε_c − ε_u is multiplied by s = 50. This script
runs one MultiViewUNet on the same inputs in float32 and in half precision and reports the relative error of
ε_c, of ε_c − ε_u and of both gradients:

    python -m bench.mvdream_precision            # tiny random-weight UNet on the CPU (bfloat16 if the CPU
                                                 # build lacks float16 kernels; the JSON says which)
    python -m bench.mvdream_precision --full     # the full sd-v2.1-base-4view UNet, random weights (CUDA)

Random weights: ε_c − ε_u of a random network is not a trained model's, so the figure is an indication of the
rounding's size relative to the CFG term, not of its effect on a real run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from fourdfy.guidance.noise import scaled_linear_alphas_cumprod
from fourdfy.guidance.random_weights import TINY_MVDREAM_UNET
from fourdfy.models.mvdream_unet import MVDREAM_SD21_BASE_4VIEW_CONFIG, MultiViewUNet
from fourdfy.render.cameras import cameras_from_spherical, mvdream_camera

GUIDANCE_SCALE = 50.0  # configs/fourdfy_stage_1.yaml guidance_multi_view.guidance_scale


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def measure(full: bool, device: torch.device, t: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    config = dict(MVDREAM_SD21_BASE_4VIEW_CONFIG if full else TINY_MVDREAM_UNET)
    unet = MultiViewUNet(**config).to(device).eval()
    side = 32 if full else 4  # latent side: 256² renders (image_size 256 / 8) at full size
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4, 4, side, side, generator=gen)
    noise = torch.randn(4, 4, side, side, generator=gen)
    context = torch.randn(8, 77, config["context_dim"], generator=gen)  # [cond ×4, uncond ×4]
    cams = cameras_from_spherical(torch.full((4,), 15.0), torch.arange(4) * 90.0, torch.full((4,), 2.8),
                                  torch.full((4,), 40.0))
    camera = mvdream_camera(cams.c2w.float()).repeat(2, 1)
    a_bar = float(scaled_linear_alphas_cumprod()[t])
    z_t = math.sqrt(a_bar) * z + math.sqrt(1 - a_bar) * noise

    def run(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        net = unet.to(dtype)
        with torch.no_grad():
            eps = net(torch.cat([z_t, z_t]).to(device, dtype), torch.full((8,), t, device=device),
                      context.to(device, dtype), camera.to(device, dtype), 4).float().cpu()
        eps_c, eps_u = eps.chunk(2)
        eps_cfg = eps_u + GUIDANCE_SCALE * (eps_c - eps_u)
        x0 = z_t / math.sqrt(a_bar) - math.sqrt(1 / a_bar - 1) * eps_cfg
        return {"eps_c": eps_c, "cfg_term": eps_c - eps_u, "sds_grad": (1 - a_bar) * (eps_cfg - noise),
                "recon_grad": z_t - x0}

    reference = run(torch.float32)
    half = torch.float16
    try:
        low = run(half)
    except (RuntimeError, NotImplementedError):  # a CPU build without some float16 kernel
        half = torch.bfloat16
        low = run(half)
    return {
        "unet": "sd-v2.1-base-4view" if full else "tiny", "device": device.type, "half_dtype": str(half),
        "t": t, "guidance_scale": GUIDANCE_SCALE, "latent_side": side,
        "rel_error": {k: _rel(low[k], reference[k]) for k in reference},
        "cfg_term_over_eps_c": float(reference["cfg_term"].norm() / reference["eps_c"].norm()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full-size UNet (needs CUDA)")
    parser.add_argument("--t", type=int, nargs="*", default=[50, 500, 900], help="timesteps to measure at")
    args = parser.parse_args(argv)
    if args.full and not torch.cuda.is_available():
        print(json.dumps({"skipped": "--full needs a CUDA GPU (torch.cuda.is_available() is False)"}))
        return 0
    device = torch.device("cuda" if args.full else "cpu")
    print(json.dumps([measure(args.full, device, t) for t in args.t], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
