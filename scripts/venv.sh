# Sourced by the set-up scripts: create and enter .venv, install torch (the CPU build where no
# torch is present yet), then sparsetrain with the extras given as arguments.
# --no-build-isolation: setup.py compiles the native extension against the torch installed here;
# an isolated build environment would download a second torch just to build.
python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q "setuptools>=69" wheel
python -m pip install -q --no-build-isolation -e ".[$1]"
