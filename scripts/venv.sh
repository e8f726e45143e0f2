# Sourced by the set-up scripts: create and enter .venv, install torch (the CPU build where no
# torch is present yet), then sparsetrain with the extras given as arguments.
python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[$1]"
