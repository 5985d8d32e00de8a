"""Hydra entry point: compose the config, then ``fourdfy.api.generate``.

  python run.py preset=demo_cpu                        # the CPU demo (toy world)
  python run.py prompt="a panda dancing" preset=paper  # one prompt with the real priors (GPU)
  python run.py -m variant=full,no_image_guidance,no_3d,no_vsd,no_hybrid,hexplane prompts=ablation5 \
      preset=paper hydra/launcher=slurm                # Table 2's ablation sweep on SLURM
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fourdfy.api import generate
from fourdfy.config import RunConfig, register_configs

register_configs()  # before @hydra.main composes: conf/config.yaml extends the schema and uses `slug`


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dict_cfg: DictConfig) -> float | None:
    cfg: RunConfig = OmegaConf.to_object(dict_cfg)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.logger.group is None and hydra_cfg.mode == RunMode.MULTIRUN:
        cfg.logger.group = Path(hydra_cfg.sweep.dir).name  # one W&B group per sweep
    metrics = generate(cfg, run_dir)
    return metrics.get("psnr")


if __name__ == "__main__":
    main()
