#!/usr/bin/env bash
# Install sparsetrain with the methods' dependencies into .venv and run the main job:
# pruning training runs on real MNIST digits, with the best backend usable here.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh methods,triton
sparsetrain info
sparsetrain demo --out runs/demo "$@"
