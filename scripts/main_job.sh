#!/usr/bin/env bash
# Install sparsetrain with the methods' dependencies into .venv and run the main job:
# pruning training runs on real MNIST digits, with the best backend usable here.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[methods,triton]"
sparsetrain info
sparsetrain demo --out runs/demo "$@"
