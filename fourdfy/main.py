"""The training entry point: compose the config (Hydra), then ``fourdfy.api.generate``.

``python run.py ...`` in a checkout and the ``fourdfy-run ...`` console script of an installed package both call
:func:`main`; the config tree is ``fourdfy/conf`` (in a checkout a link to the repository's ``conf/``, in a wheel
a copy of it).

  python run.py preset=demo_cpu                        # the CPU demo (toy world)
  python run.py prompt="a panda dancing" preset=paper  # one prompt with the real priors (GPU)
  python run.py -m variant=full,no_image_guidance,no_3d,no_vsd,no_hybrid,hexplane prompts=ablation5 \\
      preset=paper hydra/launcher=slurm                # Table 2's ablation sweep on SLURM
  python run.py -m preset=demo_cpu init_from=outputs/demo_cpu/full/a_red_ball_bouncing_on_a_blue_box/default/seed0 \\
      init_at=stage2 guidance.synthetic.video.loss_weight=0.1,0.3,1.0   # stage 3 only, from one stage-2 checkpoint

Each run's directory is outputs/<preset>/<variant>/<prompt>/<tag>/seed<N> (fourdfy/identity.py, through the
run_subdir resolver of conf/config.yaml): launching a config again finds its own directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fourdfy.api import generate
from fourdfy.config import CONF_DIR, RunConfig, register_configs
from fourdfy.errors import UserError
from fourdfy.identity import identity_of, register_run_subdir_resolver

register_configs()  # before @hydra.main composes: conf/config.yaml extends the schema
register_run_subdir_resolver()  # conf/config.yaml's run directories


# An absolute path: Hydra resolves a relative one against the calling module's package (fourdfy.conf, a folder
# of YAML files and no Python package), but a file path the same in a checkout and an installed wheel.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(dict_cfg: DictConfig) -> float | None:
    cfg: RunConfig = OmegaConf.to_object(dict_cfg)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.logger.group is None and hydra_cfg.mode == RunMode.MULTIRUN:
        # One W&B group per configuration (a row of ablations.collect): its prompts and seeds together.
        who = identity_of(cfg)
        cfg.logger.group = f"{who.preset}/{who.variant}/{who.tag}"
    try:
        metrics = generate(cfg, run_dir)
    except UserError as err:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # a sweep's launcher records the failed job (submitit: in the job's result) and reports it
        # The message names the key (or path, or package) and the fix: one line, no traceback; status 2 as for
        # a usage error.
        print(f"run.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("psnr")
