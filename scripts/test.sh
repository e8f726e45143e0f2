#!/usr/bin/env bash
# Install sparsetrain with its test dependencies into .venv and run the test suite.
# CPU machines get the CPU build of torch; Triton kernels run under TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh test
python -m pytest -p no:cacheprovider "$@"
