#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks (it has torch, transformers, peft, safetensors and
# accelerate, no network) into .whl/ (git-ignored through .git/info/exclude). Run here, in the repo root.
# The machine runs Python 3.12 on x86-64 (see bench/README.md for the one-line install-and-run command).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
mkdir -p "$WHL" .git/info
grep -qxF "/$WHL/" .git/info/exclude 2>/dev/null || echo "/$WHL/" >> .git/info/exclude
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# Versions = the ones in this project's venv (constraints.txt), so both machines run the same code.
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$WHL" \
  diffusers==0.42.1 importlib_metadata==10.2.0 hydra-core==1.3.8 omegaconf==2.3.1 imageio-ffmpeg==0.8.1
# antlr4-python3-runtime (omegaconf's parser) is published as an sdist only: build its pure-Python wheel.
"$PY" -m pip wheel --no-deps -w "$WHL" antlr4-python3-runtime==4.9.3
ls -la "$WHL"
