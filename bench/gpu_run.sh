#!/usr/bin/env bash
# The one prepared GPU check (issue #18; bench/README.md "GPU run"): on one CUDA GPU with nothing downloaded it
#   1. installs what the machine lacks from .whl/ (fill it here first: bash bench/gpu_wheels.sh),
#   2. runs the tests that use CUDA when it is there (tests/test_hashgrid.py, tests/test_hashgrid_triton.py),
#   3. trains the paper's pipeline with random full-size priors, run.py preset=paper guidance.weights=random, for a
#      few hundred iterations (three shortened stages, occupancy updates, render-size switches, checkpoints), stops
#      it with SIGUSR2 as SLURM does before a time limit (it checkpoints and exits), resumes it with the same command
#      to the end, and writes the exports,
#   4. times every update kind with python -m bench.gpu for preset=paper and preset=paper_24gb.
# Each step runs under `timeout`; the limits add up to under 8 minutes on one H200 (unmeasured so far: the
# summary's seconds say). Everything lands in $OUT (at most 8 files: the device tool brings back no more):
#   summary.txt  steps with exit status and seconds, nvidia-smi, versions
#   tests.log  pipeline.log  bench.log      the steps' output
#   bench_paper.json  bench_paper_24gb.json  bench.gpu's results (copy them to bench/results/<gpu>_<preset>.json)
#   run.tar.gz   the run directory without its checkpoints (config, log.jsonl, renders)
# Use: device tool, command `bash bench/gpu_run.sh`, carry [".whl"]. DRY_RUN=1 bash bench/gpu_run.sh (any machine)
# prints the steps and composes the pipeline's config, running nothing heavy.
# Knobs (environment): STAGES (default [60,60,80]), WORK (run directory root), OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fourdfy-gpu-out}
WORK=${WORK:-/tmp/fourdfy-gpu-work}
STAGES=${STAGES:-[60,60,80]}
DRY_RUN=${DRY_RUN:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1

# step NAME LIMIT_S LOG CMD...: run CMD under timeout, appending to $OUT/LOG; one summary line per step.
step() {
  local name=$1 limit=$2 log=$OUT/$3
  shift 3
  echo "== $name (limit ${limit}s): $*" | tee -a "$log" >> "$SUMMARY"
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  local start rc
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  echo "   $name: rc=$rc$([ $rc = 124 ] && echo ' (time limit)') in $(( $(date +%s) - start )) s" >> "$SUMMARY"
  return $rc
}

{ date -u +%Y-%m-%dT%H:%M:%SZ
  if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  else echo "no nvidia-smi"; fi; } >> "$SUMMARY" 2>&1

# 1. Wheels (diffusers, hydra-core, omegaconf, antlr4, importlib_metadata, imageio-ffmpeg: bench/gpu_wheels.sh).
if [ "$DRY_RUN" != 1 ] && ls .whl/*.whl > /dev/null 2>&1; then
  step install 120 install.log "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
  echo "   install: no .whl/ here (dry run, or the packages are installed)" >> "$SUMMARY"
fi
"$PY" -c "import torch, diffusers, hydra, imageio_ffmpeg; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" >> "$SUMMARY" 2>&1

# 2. The tests that use CUDA when it is there (none is marked: they ask torch.cuda.is_available()).
step tests 40 tests.log "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_hashgrid.py tests/test_hashgrid_triton.py

# 3. The paper pipeline with random full-size priors: stopped by SIGUSR2 (checkpoint + exit), then resumed.
RUN=$WORK/run
PIPELINE=(preset=paper guidance.weights=random "schedule.stage_lengths=$STAGES" "prompt='a panda dancing'"
  trainer.checkpoint_every=50 trainer.occupancy_warmup=32 trainer.progress_bar=false trainer.log_every=5
  eval.validation_every=100 eval.video_frames=32 "hydra.run.dir=$RUN")
if [ "$DRY_RUN" = 1 ]; then  # the overrides compose (schema, preset, values) on any machine
  "$PY" -c "import sys; from fourdfy.config import compose_run_config; \
c = compose_run_config([a for a in sys.argv[1:] if not a.startswith('hydra.')] + ['device=cpu']); \
print('pipeline config composes:', c.preset.name, c.guidance.weights, c.schedule.stage_lengths)" "${PIPELINE[@]}" \
    | tee -a "$SUMMARY"
fi
rm -rf "$RUN"
step pipeline_until_usr2 80 pipeline.log timeout --signal=USR2 65 "$PY" run.py "${PIPELINE[@]}"
ls "$RUN/checkpoints" >> "$OUT/pipeline.log" 2>&1
step pipeline_resume 120 pipeline.log "$PY" run.py "${PIPELINE[@]}"
if [ "$DRY_RUN" != 1 ]; then
  grep -h "resumed\|finished\|stage .* starts\|Error\|error" "$OUT/pipeline.log" | tail -12 >> "$SUMMARY"
  [ -f "$RUN/DONE" ] && echo "   pipeline: DONE" >> "$SUMMARY" || echo "   pipeline: NOT DONE" >> "$SUMMARY"
  tar czf "$OUT/run.tar.gz" -C "$WORK" --exclude=run/checkpoints run 2>> "$SUMMARY"
fi

# 4. bench.gpu: per-kind iteration, parts, floor, peak memory, projected hours per scene.
step bench_paper 60 bench.log "$PY" -m bench.gpu --preset paper --iters 2 --warmup 1 --out "$OUT/bench_paper.json"
step bench_paper_24gb 60 bench.log "$PY" -m bench.gpu --preset paper_24gb --iters 2 --warmup 1 \
  --out "$OUT/bench_paper_24gb.json"
# VideoCrafter2 (issue #19): the VID update of preset=paper_vc with random full-size weights.
step bench_paper_vc 45 bench.log "$PY" -m bench.gpu --preset paper_vc --kinds vid --iters 2 --warmup 1 \
  --out "$OUT/bench_paper_vc.json"
# 5. fp16 vs fp32 MVDream at CFG 50 on the full-size UNet (issue #15 row 7).
step mvdream_precision 30 precision.log "$PY" -m bench.mvdream_precision --full
for f in "$OUT"/bench_*.json; do
  [ -f "$f" ] && "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1].rsplit('/',1)[-1], \
{k: (e.get('iteration_s'), e.get('peak_memory_gib'), e.get('error')) for k, e in r['kinds'].items()}, r['projection'])" \
    "$f" >> "$SUMMARY" 2>&1
done
cat "$SUMMARY"
