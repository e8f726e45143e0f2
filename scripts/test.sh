#!/usr/bin/env bash
# Install sparsetrain with its test dependencies into .venv and run the test suite.
# CPU machines get the CPU build of torch; Triton kernels run under TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
python -m pytest -p no:cacheprovider "$@"
